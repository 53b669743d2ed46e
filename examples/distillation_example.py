"""Distill the embedded tiny MoE teacher into its compressed student with the Python API.

    python examples/distillation_example.py [output_dir] [overrides ...]   # CPU, a few minutes
    python examples/distillation_example.py outputs/ex loss.alpha=0.7 cache.top_k=32

The same job as ``moedistill compress && moedistill cache && moedistill train``, with the
pieces in view. ``moedistill.commands.train.train_from_config(cfg)`` does steps 2-5 in one call.
"""

import argparse
import json
from pathlib import Path

from moedistill.cache import open_cache
from moedistill.commands.cache import generate_from_config
from moedistill.commands.compress import compress_from_config
from moedistill.commands.train import training_arguments
from moedistill.config import load_config
from moedistill.losses import distillation_loss
from moedistill.models import get_model
from moedistill.stages import plan_stages, run_stages
from moedistill.targets import eval_kl_key
from moedistill.trainer import collate

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("output_dir", nargs="?", default="outputs/example", help="where every artefact goes")
parser.add_argument("overrides", nargs="*", help="Hydra-style overrides of tiny.yaml, e.g. loss.alpha=0.7")
cli = parser.parse_args()
out = cli.output_dir

# 1. Configuration: conf/distillation/tiny.yaml plus Hydra-style overrides.
cfg = load_config("tiny", [f"output_dir={out}", *cli.overrides])

# 2. The student: the teacher's experts compressed to a shared core + rank-r wrappers (checkpoint-0).
checkpoint0 = compress_from_config(cfg)
student, tokenizer = get_model(str(checkpoint0), tokenizer_from=cfg.teacher.name)

# 3. The teacher's predictions, computed once and cached as sparse top-k log-probs.
#    Items: input_ids [L], labels [L] (already shifted), target_ids / target_logprobs [L, k].
train_set = open_cache(generate_from_config(cfg), expect={"teacher": cfg.teacher.name, "seq_len": cfg.data.seq_len})
eval_set = open_cache(generate_from_config(cfg, split=cfg.data.eval_split))

# 4. The loss is a pure function: L = (1 - alpha) CE + alpha T^2 KL(q_T || p_T).
batch = collate([train_set[i] for i in range(2)])
parts = distillation_loss(
    student(input_ids=batch["input_ids"]).logits, batch["labels"], batch["target_ids"], batch["target_logprobs"],
    alpha=cfg.loss.alpha, temperature=cfg.loss.temperature, tail=cfg.loss.tail,
)
print(f"checkpoint-0 on one batch: total {parts.total:.3f} = (1-a) * ce {parts.ce:.3f} + a T^2 * kl {parts.kl:.3f}")

# 5. Training: each stage (cfg.stages) gets its own regex parameter groups, learning rate and
#    loss settings; a DistillationTrainer (a transformers.Trainer) runs each one. Stage 1 of
#    tiny.yaml trains only `.*wrapper.*`; stage 2 trains everything with per-rule multipliers.
run_dir = Path(out) / "train" / "example"
args = training_arguments(cfg, run_dir)  # TrainingArguments from cfg.training
stages = plan_stages(cfg, args, num_examples=len(train_set))
result = run_stages(
    student, stages, args, run_dir, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer
)

# 6. Results: validation metrics before/after, and the log with a global step and the stage of each entry.
before, after = result["initial_eval"], result["final_eval"]
kl = eval_kl_key(after)  # which KL: eval_kl_lower_bound from a top-k eval cache (docs/DISTILLATION.md)
print(f"validation KL to the teacher (lower bound): {before[kl]:.4f} -> {after[kl]:.4f}")
print(f"validation perplexity:        {before['eval_perplexity']:.2f} -> {after['eval_perplexity']:.2f}")
log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
for entry in [e for e in log if "loss" in e or kl in e][-3:]:
    print({k: entry[k] for k in ("step", "stage_name", "loss", "ce_loss", "kl_loss", kl) if k in entry})
print(f"trained student: {result['final_model']}  (load it with moedistill.models.get_model)")
