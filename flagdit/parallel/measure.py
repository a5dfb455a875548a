"""The plan's first measured point: one Flag-DiT block's forward and backward on one device in each activation
checkpointing mode, against :func:`flagdit.parallel.plan.one_block`.

``python -m flagdit.parallel.measure [--config flag-dit-7b] [--tokens 16384,32768] [--jsonl PATH]`` builds one
block of the config in bf16 (the embedders, no other block), one sample of each token count with a 256-token
caption, and prints per case the bytes autograd saved (:class:`flagdit.memory.SavedBytes`) and, on CUDA, the
peak allocated above the weights and the block's input, each beside the plan's prediction; ``--jsonl``
appends the same as one ``{"kind": "memory", ...}`` record per case (``benchmarks/gpu_check.sh --phases
memory``).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ..configs import get_config
from ..memory import SavedBytes
from ..model import CHECKPOINTING, FlagDiT
from . import plan

CAPTION_TOKENS = 256


def _latent(tokens: int, config) -> torch.Tensor:
    """One latent of about ``tokens`` tokens: ``rows`` patch rows of ``cols`` patches (+1 [nextline] each)."""
    rows = max(1, round(math.sqrt(tokens)))
    cols = max(1, tokens // rows - (1 if config.nextline else 0))
    p = config.patch_size
    return torch.randn(config.in_channels, rows * p, cols * p)


def measure(config_name: str, tokens: int, checkpointing: str, device: torch.device, backend=None) -> dict:
    """One case: the block's saved bytes and peak (CUDA) beside the plan's."""
    config = get_config(config_name, n_layers=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = FlagDiT(config, backend=backend, checkpointing=checkpointing).to(torch.bfloat16)
    cap = torch.randn(1, CAPTION_TOKENS, config.cap_feat_dim, device=device)
    with torch.no_grad():
        inputs = model.prepare([_latent(tokens, config).to(device)], torch.rand(1, device=device), cap,
                               torch.ones(1, CAPTION_TOKENS, device=device))  # fmt: skip
        h, adaln = model.embed_rows(inputs)
    h.requires_grad_()
    block = model.layers[0]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with SavedBytes(model) as saved:
        out = block(h, inputs.layout, inputs.text, None, adaln)
    saved_bytes = saved.bytes
    out.backward(torch.randn_like(out))
    n = h.shape[0]
    predicted = plan.one_block(plan.Model.of(config), n, checkpointing)
    record = {
        "kind": "memory",
        "config": config_name,
        "tokens": n,
        "checkpointing": checkpointing,
        "device": str(device),
        "saved_bytes": saved_bytes,
        "predicted_saved_bytes": predicted["saved"],
    }
    if cuda:
        torch.cuda.synchronize(device)
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        record["predicted_peak_bytes"] = predicted["peak"]
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m flagdit.parallel.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="flag-dit-7b", help="model config (default flag-dit-7b)")
    p.add_argument("--tokens", default="16384,32768", help="comma-separated token counts (default 16384,32768)")
    p.add_argument("--modes", default="none,block,selective", help="checkpointing modes (default: all three)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="flagdit_kernels backend preference (default: the fastest)")
    p.add_argument("--jsonl", help="append one record per case to this file")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(CHECKPOINTING):
        p.error(f"--modes: a comma-separated subset of {', '.join(CHECKPOINTING)}, got {args.modes}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for mode in modes:
            record = measure(args.config, tokens, mode, torch.device(args.device), args.backend)
            line = json.dumps(record)
            print(line, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
