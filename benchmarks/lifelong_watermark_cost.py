"""Benchmark (issue 18, part 3): what one watermark embedding costs a trained adapter, and how much of the mark it
plants, per optimizer, learning rate and step count, without a federated run.

Starts from the final adapter of a finished run without a watermark (e.g. the clean run of
``lifelong_watermark.py``), applies the server's embedding step once (:class:`fedlm.watermark.embed.Marker`'s
SFT steps on the shared trigger set, the same trainer the clients use, with gradient clipping at 1.0), and reports
the relative change of the test loss on the first ``--test-examples`` held-out WordNet definitions and the trigger
accuracy with its p-value (``fedlm watermark verify``). Each setting starts again from the clean adapter.

``+rN`` after a setting adds the data-free retain set (:mod:`fedlm.watermark.retain`): N conversations the clean
model writes itself, trained on with the triggers.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lifelong_watermark_cost.py RUN_DIR adamw:10@2e-3 sgd:20@0.1 adamw:20@2e-3+r64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from lifelong_watermark import SECRET, thief_examples

from fedlm.core.task import LocalPlan
from fedlm.data.collate import collate_for_loss
from fedlm.federation.trainer import ClientTrainer
from fedlm.models.adapters import load_trainable_state, trainable_state
from fedlm.objectives.base import sequence_logps
from fedlm.watermark.embed import WATERMARK_ID, marked_state
from fedlm.watermark.retain import retain_examples
from fedlm.watermark.suspect import Suspect, open_suspect
from fedlm.watermark.triggers import SHARED, training_examples, trigger_set
from fedlm.watermark.verify import verify_model


def setting(text: str) -> tuple[str, int, float, int]:
    """``OPTIMIZER:STEPS@LR[+rN]`` (e.g. ``adamw:10@2e-3+r64``) as (optimizer, steps, lr, retain conversations)."""
    text, _, retain = text.partition("+r")
    optimizer, _, rest = text.partition(":")
    steps, _, lr = rest.partition("@")
    if optimizer not in ("adamw", "sgd") or not steps or not lr or (retain and not retain.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected OPTIMIZER:STEPS@LR[+rN] with OPTIMIZER adamw or sgd, e.g. adamw:10@2e-3+r64")
    return optimizer, int(steps), float(lr), int(retain or 0)


@torch.no_grad()
def test_loss(suspect: Suspect, examples: list, pad_id: int) -> float:
    """Token-mean NLL of the answers of ``examples``."""
    suspect.model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), 16):
        batch = collate_for_loss(examples[start : start + 16], pad_id)
        logps, counts = sequence_logps(suspect.model, batch)
        total, tokens = total - float(logps.sum()), tokens + int(counts.sum())
    return total / max(tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run without a watermark")
    parser.add_argument("settings", nargs="+", type=setting, help="OPTIMIZER:STEPS@LR, e.g. adamw:10@2e-3")
    parser.add_argument("--size", type=int, default=64, help="shared triggers")
    parser.add_argument("--test-examples", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    suspect = open_suspect(args.run, trainable=True)
    clean = {k: v.clone() for k, v in trainable_state(suspect.model).items()}
    pad = int(suspect.tokenizer.pad_token_id or 0)
    test = thief_examples(args.run, suspect)[: args.test_examples]  # the held-out WordNet definitions
    triggers = training_examples(suspect.tokenizer, trigger_set(SECRET, SHARED, args.size))
    base = test_loss(suspect, test, pad)
    print(f"clean adapter of {args.run}: test loss {base:.4f} on {len(test)} examples; {args.size} triggers; {torch.get_num_threads()} threads")
    print("| optimizer | steps | lr | retain | trigger loss (mean over steps) | test loss | cost | trigger acc. | p-value | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for optimizer, steps, lr, retain in args.settings:
        started = time.perf_counter()
        load_trainable_state(suspect.model, clean)
        kept = retain_examples(suspect.model, suspect.tokenizer, suspect.device, retain, 1) if retain else []
        trainer = ClientTrainer(suspect.model, pad, suspect.device, optimizer=optimizer)
        update = trainer.train(WATERMARK_ID, triggers + kept, clean, LocalPlan(0, [lr] * steps, 8, 1, None, None))
        load_trainable_state(suspect.model, marked_state(clean, update.tensors))
        loss = test_loss(suspect, test, pad)
        check = verify_model(suspect.model, suspect.tokenizer, suspect.device, SECRET, args.size)
        print(
            f"| {optimizer} | {steps} | {lr:g} | {len(kept)} | {update.metrics['loss']:.3f} | {loss:.4f} | {loss / base - 1:+.2%} | "
            f"{check.accuracy:.3f} | {check.p_value:.2g} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
