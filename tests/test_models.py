"""get_model and the embedded teacher."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moedistill.errors import UserError
from moedistill.fingerprints import model_fingerprint
from moedistill.models import TINY_TEACHER, get_model

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_teacher_is_a_qwen3_moe_of_the_promised_shape(tiny):
    model, tok = tiny
    c = model.config
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert c.num_hidden_layers >= 4 and c.num_experts >= 8 and c.num_experts_per_tok == 2 and c.norm_topk_prob
    assert c.moe_intermediate_size != c.hidden_size
    assert 4096 <= len(tok) <= 8192 and c.vocab_size == len(tok)
    assert tok.eos_token_id is not None


def test_local_dir_roundtrip_and_dtype(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = get_model(str(tmp_path), dtype="bfloat16")
    assert next(m2.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(m2) == model_fingerprint(model)
    m3, _ = get_model(str(tmp_path), with_tokenizer=False)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(m3(input_ids=x).logits, model(input_ids=x).logits)


def test_missing_model_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_model(str(tmp_path / "no-such-model"))


def test_readme_teacher_perplexity_is_reproduced():
    """The README's numbers are recomputed from the shipped weights (same script the README cites)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_tiny_teacher.py"), "--eval_only"],
                       capture_output=True, text=True, check=True)
    m = re.search(r"teacher ([\d.]+), unigram ([\d.]+)", r.stdout)
    ppl, uni = float(m.group(1)), float(m.group(2))
    assert ppl < uni / 5, "the embedded teacher must be a real language model"
    summary = json.loads((TINY_TEACHER / "training_summary.json").read_text())
    assert abs(summary["val_perplexity"] - ppl) < 0.01 * ppl
    readme = (ROOT / "README.md").read_text()
    assert f"{ppl:.2f}" in readme and f"{uni:.2f}" in readme
