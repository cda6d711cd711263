"""Rebuild a canopy head exported by `canopy train` in plain PyTorch, from its card alone.

    from rebuild_head import rebuild_head
    head = rebuild_head("runs/fmnist_lite0/heads/class_mlp.json")   # a torch.nn.Module
    logits = head(features)     # features: [N, card["in_features"]] from the same cache/tap
    card = json.load(open("runs/fmnist_lite0/heads/class_mlp.json"))
    answers = head_answers(card, logits)   # as canopy predict gives them

Built-in heads only (linear, mlp); docs/training.md shows this file and explains the layout.
"""
import json
import os

import torch
from safetensors.torch import load_file

ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh, "silu": torch.nn.SiLU}


def rebuild_head(card_path):
    card = json.load(open(card_path))
    p = card["head_params"]  # every option, defaults included
    d, k = card["in_features"], card["out_features"]
    if card["head"] == "linear":
        # LinearHead registers one torch::nn::Linear as "linear".
        head = torch.nn.Module()
        head.linear = torch.nn.Linear(d, k, bias=p["bias"] == "true")
        head.forward = head.linear.forward
    elif card["head"] == "mlp":
        # MlpHead is a Sequential "layers": Linear, activation, [Dropout], ... Linear; the
        # index in a tensor name ("layers.2.weight") counts the activation and dropout too.
        layers, width = [], d
        for h in (int(x) for x in p["hidden"].split(",")):
            layers += [torch.nn.Linear(width, h), ACTIVATIONS[p["activation"]]()]
            if float(p["dropout"]) > 0:
                layers.append(torch.nn.Dropout(float(p["dropout"])))
            width = h
        layers.append(torch.nn.Linear(width, k))
        head = torch.nn.Module()
        head.layers = torch.nn.Sequential(*layers)
        head.forward = head.layers.forward
    else:
        raise ValueError(f"{card_path}: '{card['head']}' is not a built-in head")
    weights = load_file(os.path.join(os.path.dirname(card_path), card["weights"]))
    head.load_state_dict(weights, strict=True)  # every tensor named as canopy wrote it
    return head.eval()


def head_answers(card, logits):
    """What `canopy predict` answers from a head's logits, as the card says: a multiclass head's
    probabilities softmax(logits / temperature) (temperature 1 unless calibrate = temperature) and
    its class indices; a multilabel head's sigmoid probabilities and 0/1 labels (each over its
    threshold); a regression's values in the label's units."""
    if card["kind"] == "regression":
        return {"values": logits[:, 0] * card["target_std"] + card["target_mean"]}
    if card["kind"] == "multilabel":
        cuts = torch.tensor(card["threshold_logits"], dtype=torch.float32)
        return {"probabilities": logits.sigmoid(), "labels": (logits > cuts).long()}
    return {"probabilities": (logits / card.get("temperature", 1.0)).softmax(1), "classes": logits.argmax(1)}
