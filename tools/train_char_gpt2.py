"""Train the tiny character-level GPT-2 shipped in ``pathsmc/models/weights`` (``char_gpt2.*``).

Corpus: the docstrings (module, class and function) of a fixed list of pure-Python standard
library modules, read from ``sysconfig.get_paths()["stdlib"]`` — present on every machine with
Python, nothing downloaded. Cleaning (see :func:`clean`): lower case, doctest lines dropped,
characters outside :data:`ALPHABET` dropped, whitespace collapsed; each docstring becomes one
line ending in ``"\\n"`` (the end-of-sequence token of the model). The corpus depends on the
Python version's stdlib text; its SHA-256 and size are written into the metadata JSON.

Model: ``GPT2LMHeadModel`` from a config (4 layers, 4 heads, width 128, context 128), trained
with AdamW on random windows of the corpus, one CPU thread (about 15 min on a 2-core machine).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tools/train_char_gpt2.py [--steps N]
    .venv/bin/python tools/train_char_gpt2.py --time-steps 20   # measure s/step only
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

ALPHABET = "\n abcdefghijklmnopqrstuvwxyz0123456789.,;:'()-_"
"""The vocabulary: token id = index in this string; id 0 (newline) is EOS."""

MODULES = [
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codecs",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "imaplib", "inspect", "ipaddress", "keyword", "linecache", "locale", "mailbox",
    "mimetypes", "netrc", "numbers", "operator", "optparse", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "reprlib",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "uuid", "warnings", "wave", "weakref", "zipapp", "zipimport",
]
"""Top-level stdlib modules whose docstrings form the corpus (missing ones are skipped)."""

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, n_positions=128)


def clean(doc: str) -> str:
    """One docstring → one line of the alphabet (empty if nothing is left)."""
    lines = [ln for ln in doc.lower().splitlines()
             if not ln.strip().startswith((">>>", "..."))]
    text = " ".join(lines)
    text = "".join(c for c in text if c in ALPHABET and c != "\n")
    return re.sub(r"\s+", " ", text).strip()


def corpus(stdlib: str | None = None) -> tuple[str, list[str]]:
    """The cleaned corpus text and the list of modules read."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out, used = [], []
    for name in MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        used.append(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                line = clean(doc) if doc else ""
                if len(line) >= 20:
                    out.append(line + "\n")
    return "".join(out), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                         / "python/pathsmc/models/weights"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    text, used = corpus()
    data = torch.tensor([ALPHABET.index(c) for c in text], dtype=torch.int64)
    n_val = len(data) // 20
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(used)} modules, {len(text)} chars, {text.count(chr(10))} lines",
          flush=True)
    cfg = GPT2Config(vocab_size=len(ALPHABET), bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **CONFIG)
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    steps = args.time_steps or args.steps
    warm = min(100, steps // 10 + 1)
    ctx = cfg.n_positions
    gen = torch.Generator().manual_seed(args.seed)

    def batch(src: torch.Tensor, bs: int) -> torch.Tensor:
        i = torch.randint(0, len(src) - ctx, (bs,), generator=gen)
        return torch.stack([src[j:j + ctx] for j in i.tolist()])

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, len(val) - ctx, (64,), generator=g)
        x = torch.stack([val[j:j + ctx] for j in idx.tolist()])
        loss = model(input_ids=x, labels=x).loss.item()
        model.train()
        return loss

    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        lr = args.lr * min(1.0, step / warm) * (
            0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))) * 0.9 + 0.1)
        for gr in opt.param_groups:
            gr["lr"] = lr
        x = batch(train, args.batch)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            el = time.time() - t0
            print(f"step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} "
                  f"{el / step:.3f} s/step", flush=True)
    el = time.time() - t0
    if args.time_steps:
        print(f"timing: {el / steps:.3f} s/step", flush=True)
        return
    vl = val_loss()
    print(f"val loss {vl:.3f} nats/char ({vl / math.log(2):.3f} bits/char), {el:.0f} s",
          flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied to transformer.wte.weight
    save_file(state, str(out / "char_gpt2.safetensors"))
    meta = {
        "alphabet": ALPHABET, "eos_token_id": 0, "config": cfg.to_diff_dict(),
        "corpus": {"modules": used, "chars": len(text),
                   "sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "python": ".".join(map(str, sys.version_info[:3]))},
        "train": {"steps": steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                  "threads": args.threads, "seconds": round(el), "val_loss_nats": round(vl, 4)},
    }
    (out / "char_gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / 'char_gpt2.safetensors'}, {out / 'char_gpt2.json'}", flush=True)


if __name__ == "__main__":
    main()
