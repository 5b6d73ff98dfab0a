"""The shipped character GPT-2 (pathsmc.models.char_lm) and the lipogram demo
(pathsmc.commands.lm_demo).

Skipped when transformers/safetensors or the weights (python/pathsmc/models/weights/char_gpt2.*,
made by tools/train_char_gpt2.py) are missing."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from pathsmc.models import char_lm  # noqa: E402

HAVE_WEIGHTS = (char_lm.WEIGHTS_DIR / char_lm.WEIGHTS_FILE).exists() and (
    char_lm.WEIGHTS_DIR / char_lm.META_FILE).exists()
pytestmark = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="char_gpt2 weights missing (run tools/train_char_gpt2.py)")

SENTENCE = "return the number of items in the list.\n"


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    return char_lm.load_char_lm()


def test_loader_and_tokenizer(lm) -> None:
    model, tok = lm
    info = char_lm.char_lm_info()
    assert tok.alphabet == info["alphabet"] and tok.vocab_size == model.config.vocab_size == 47
    assert tok.alphabet[tok.eos_token_id] == "\n"
    assert tok.decode(tok.encode("Hello, World.")) == "hello, world."
    with pytest.raises(ValueError, match="text: character '!'"):
        tok.encode("hi!")
    m = tok.mask("e")
    assert m.dtype == torch.bool and int((~m).sum()) == 1 and not m[tok.encode("e")[0]]
    assert not tok.mask(eos=False)[tok.eos_token_id]
    # tied output embedding, eval mode
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not model.training


@torch.no_grad()
def test_model_has_learned_english(lm) -> None:
    """A plain docstring sentence costs far less than the uniform log 47 = 3.85 nats/char and
    the corpus validation loss is recorded; random or corrupted weights fail this."""
    model, tok = lm
    ids = torch.tensor([tok.encode(SENTENCE)])
    nll = float(model(input_ids=ids, labels=ids).loss)
    assert nll < 1.8, nll
    assert info_val() < 1.8
    # greedy continuation of "return the " is made of the alphabet and of real words
    out = model.generate(torch.tensor([tok.encode("return the ")]), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, 11:])
    assert any(w in text for w in ("the", "of", "a", "to", "in", "is")), text


def info_val() -> float:
    return float(char_lm.char_lm_info()["train"]["val_loss_nats"])


@torch.no_grad()
def test_lipogram_log_z_exact_two_chars(lm) -> None:
    """Two new characters, no 'e': the exact Z by enumeration through the model (47 + 47²
    sequences) against SMC's pooled log Ẑ; and masked sampling's KL ≥ 0."""
    from pathsmc.integrations.transformers import lm_smc

    model, tok = lm
    prompt = torch.tensor([tok.encode("return th")])
    allowed = tok.mask("e")
    lp1 = model(input_ids=prompt).logits[0, -1].double().log_softmax(-1)
    ids = torch.cat([prompt.expand(47, -1), torch.arange(47)[:, None]], -1)
    lp2 = model(input_ids=ids).logits[:, -1].double().log_softmax(-1)
    inner = torch.logsumexp(lp2.masked_fill(~allowed, -math.inf), -1)
    inner[tok.eos_token_id] = 0.0  # EOS ends the sequence
    log_z = float(torch.logsumexp((lp1 + inner).masked_fill(~allowed, -math.inf), 0))
    assert log_z < -1.0  # "th" is followed by 'e' most of the time: the constraint bites
    runs, n = 16, 64
    r = lm_smc(model, prompt.expand(runs, -1).contiguous(), n, 2, allowed=allowed,
               eos_token_id=tok.eos_token_id, generator=torch.Generator().manual_seed(0))
    z = (r.log_z - log_z).exp()  # unbiased for 1
    se = float(z.std()) / math.sqrt(runs)
    assert abs(float(z.mean()) - 1.0) < 4 * se + 1e-3, (float(z.mean()), se)
    assert not (r.tokens == tok.encode("e")[0]).any()


def test_demo_smoke(lm) -> None:
    from pathsmc.commands.lm_demo import format_lm_demo, run_lm_demo

    r = run_lm_demo(particles=(8, 32), runs=4, max_new_tokens=16, log=None)
    assert set(r.smc_log_z) == {8, 32} and all(v.shape == (4,) for v in r.smc_log_z.values())
    assert math.isfinite(r.ref_log_z) and r.ref_log_z < 0
    assert all("e" not in s for s in r.samples_masked + r.samples_smc)
    # KL(q‖π) ≥ 0 up to the reference's Monte Carlo error
    assert r.kl_masked > -5 * r.ref_se - 0.05
    lines = format_lm_demo(r)
    assert any("KL" in ln for ln in lines) and any("reference log Z" in ln for ln in lines)


def test_cli_demo_lm(capsys) -> None:
    from pathsmc.cli import main

    assert main(["demo", "lm", "--particles", "16", "--runs", "2", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "KL(q‖π)" in out and "N=   16" in out and "N=    4" in out
    with pytest.raises(SystemExit, match="exclude"):
        main(["demo", "lm", "--particles", "16", "--runs", "2", "--steps", "8",
              "--exclude", "!"])
    with pytest.raises(SystemExit, match="context"):
        main(["demo", "lm", "--particles", "16", "--runs", "2", "--steps", "200"])
