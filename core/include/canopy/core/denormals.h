// Flushing float denormals to zero while a job trains.
//
// A head whose outputs saturate (a high learning rate drives a softmax's small probabilities
// below float32's normal range, 1.2e-38) feeds denormal numbers into its matrix multiplies,
// and x86 CPUs take a microcode assist for each: on the Xeon kind of the bench machine one
// linear head at lr 3e-2 trained 2.3x as long as one at 1e-4, and a fused group holding it slowed
// every head in it. Flush-to-zero and denormals-are-zero (MXCSR's FTZ and DAZ bits) make those
// values 0: only results that pass through numbers below 1e-38 change.
//
// The mode is per thread. A FlushDenormals sets it on the calling thread and on the threads of
// that thread's LibTorch intra-op pool, and puts back on all of them what the calling thread
// had when it ends; StepRunner's lanes run in the mode of the thread that started them. On
// CPUs other than x86 it does nothing.
#pragma once

namespace canopy {

// The calling thread's denormal mode: whether FTZ and DAZ are both on.
bool flushes_denormals();

class FlushDenormals {
 public:
  explicit FlushDenormals(bool on = true);
  ~FlushDenormals();
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  bool before_;
};

}  // namespace canopy
