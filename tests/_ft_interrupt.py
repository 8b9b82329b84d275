"""Run ``qlk finetune`` and interrupt it at a chosen point of a chosen step (tests/test_train.py).

    python tests/_ft_interrupt.py --send KILL --at optimizer --step 3 -- finetune --model ... --output-dir ...

Points of step N (1-based): ``forward`` (loss computed, before backward), ``backward`` (gradients
accumulated, before the optimizer), ``optimizer`` (parameters updated, before any checkpoint),
``checkpoint`` (inside the checkpoint of step N: adapter and optimizer written, RNG and trainer
state not yet). The signal goes to this process: SIGKILL ends it at once, SIGINT is qlk's Ctrl-C.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--send", choices=("KILL", "INT"), required=True)
    ap.add_argument("--at", choices=("forward", "backward", "optimizer", "checkpoint"), required=True)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("qlk_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    sig = signal.SIGKILL if a.send == "KILL" else signal.SIGINT
    fired = {"done": False}

    def fire():
        if not fired["done"]:
            fired["done"] = True
            os.kill(os.getpid(), sig)

    from qlk.train.trainer import QlkTrainer

    if a.at == "forward":
        real = QlkTrainer.compute_loss

        def compute_loss(self, *args, **kw):
            out = real(self, *args, **kw)
            if self.model.training and self.state.global_step == a.step - 1:
                fire()
            return out

        QlkTrainer.compute_loss = compute_loss
    elif a.at == "backward":
        real = QlkTrainer.training_step

        def training_step(self, *args, **kw):
            out = real(self, *args, **kw)
            if self.state.global_step == a.step - 1:
                fire()
            return out

        QlkTrainer.training_step = training_step
    elif a.at == "optimizer":
        calls = {"n": 0}

        def after_step(optimizer, args, kwargs):
            calls["n"] += 1
            if calls["n"] == a.step:
                fire()

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(after_step)
    else:
        real = QlkTrainer._save_rng_state

        def save_rng_state(self, output_dir):
            if self.state.global_step == a.step:
                fire()
            return real(self, output_dir)

        QlkTrainer._save_rng_state = save_rng_state

    from qlk.cli import main as qlk_main

    args = a.qlk_args[1:] if a.qlk_args[:1] == ["--"] else a.qlk_args
    sys.exit(qlk_main(args))


if __name__ == "__main__":
    main()
