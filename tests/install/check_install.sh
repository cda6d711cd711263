#!/usr/bin/env bash
# The installed package as a consumer meets it: `cmake --install` canopy into a fresh
# prefix, configure and build examples/custom_head OUT OF TREE against it (find_package),
# then run the built program on the demo configuration (pinned EfficientNet-Lite0 trunk,
# real Fashion-MNIST) at small limits: cache, train the example's own head, and list heads.
#   check_install.sh BUILD_DIR SOURCE_DIR TORCH_PREFIX
set -euo pipefail
build="$1" src="$2" torch_prefix="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
for f in include/canopy/runners/cli.h include/canopy/heads/head.h lib/cmake/canopy/canopyConfig.cmake \
         lib/cmake/canopy/canopyTargets.cmake lib/libcanopy_runners.a bin/canopy; do
  [[ -e "$work/prefix/$f" ]] || fail "the install lacks $f"
done
[[ ! -e "$work/prefix/include/canopy/datasets/hdf5.h" ]] || fail "the HDF5 layer is private, yet installed"
if grep -rqs "hdf5.h" "$work/prefix/include/canopy"; then fail "an installed header includes HDF5"; fi

# Out of tree: a copy of the example folder, nothing else from the source tree.
cp -r "$src/examples/custom_head" "$work/example"
cmake -S "$work/example" -B "$work/example-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$work/prefix;$torch_prefix" > "$work/configure.log" 2>&1 \
  || { cat "$work/configure.log"; fail "configuring the example against the installed canopy"; }
cmake --build "$work/example-build" > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "building the example"; }
prog="$work/example-build/canopy_custom_head"
"$prog" heads | grep -q "residual_mlp" || fail "the example does not list its head"

cat > "$work/job.ini" <<INI
[data]
train_limit = 512
test_limit = 256
[preprocess]
resize = 64
channels = 3
mean = 0.5
std = 0.5
[trunk]
path = \${CANOPY_HOME:-\${HOME}/.cache/canopy}/trunks/efficientnet_lite0.pt
sha256 = $(sed -n 's/^sha256 = //p' "$src/configs/fmnist_lite0.ini")
[cache]
path = $work/cache
[train]
out_dir = $work/out
epochs = 3
[task.residual]
head = residual_mlp
head.width = 64
lr = 0.003
[task.linear]
head = linear
INI
"$prog" run --config "$work/job.ini" --progress quiet > "$work/run.log" 2>&1 || { cat "$work/run.log"; fail "run"; }
grep -q "residual_mlp 192-(64)-10" "$work/run.log" || { cat "$work/run.log"; fail "the summary lacks the example head"; }
[[ -f "$work/out/heads/residual.safetensors" ]] || fail "no exported residual head"

# The C++ API without the CLI: the second example, out of tree too, on the cache just built.
cp -r "$src/examples/in_process" "$work/in_process"
cmake -S "$work/in_process" -B "$work/in_process-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$work/prefix;$torch_prefix" > "$work/configure2.log" 2>&1 \
  || { cat "$work/configure2.log"; fail "configuring the in-process example against the installed canopy"; }
cmake --build "$work/in_process-build" > "$work/build2.log" 2>&1 || { tail -40 "$work/build2.log"; fail "building the in-process example"; }
sed -e '/^\[task.residual\]/,/^lr = 0.003/d' -e "s|^out_dir = .*|out_dir = $work/out2|" "$work/job.ini" > "$work/job2.ini"
"$work/in_process-build/canopy_in_process" "$work/job2.ini" train.epochs=2 > "$work/run2.log" 2>&1 \
  || { cat "$work/run2.log"; fail "the in-process example"; }
grep -q "^cache $work/cache: up to date, 192 features per sample" "$work/run2.log" \
  || { cat "$work/run2.log"; fail "the in-process example did not find the cache up to date"; }
grep -Eq "^linear: done, accuracy 0\.[0-9]{4} after 2 epochs -> $work/out2/heads/linear.safetensors" "$work/run2.log" \
  || { cat "$work/run2.log"; fail "the in-process example's report"; }
[[ -f "$work/out2/heads/linear.safetensors" && -f "$work/out2/heads/linear.json" ]] || fail "no head exported in process"
if "$work/in_process-build/canopy_in_process" "$work/job2.ini" train.epoch=2 > "$work/run3.log" 2>&1; then
  fail "an unknown key was accepted"
fi
grep -q "config error: .*train.epoch (did you mean 'train.epochs'?)" "$work/run3.log" \
  || { cat "$work/run3.log"; fail "the in-process example's config error"; }

echo "installed canopy: headers, canopy:: targets and canopyConfig.cmake; both out-of-tree examples built and trained"
cat "$work/run2.log"
grep -E "^residual|^linear" "$work/run.log"
