"""`elasticlm serve` with faults a request can trigger, for tests/test_serve_subprocess.py (not a test module).

    python tests/serve_with_faults.py serve --checkpoint CKPT --port N [any `elasticlm serve` option]

Runs the real CLI (``elasticlm.cli.main``) in this process after wrapping :class:`elasticlm.generate.DecodeBatch`
so that a prompt containing a marker misbehaves inside the engine thread; ``elasticlm/serve.py`` is untouched:

- ``<<admit-fault>>``: prefilling the request raises ``RuntimeError`` (admission fails);
- ``<<step-fault>>``: every decoding step of a batch holding the request raises ``RuntimeError``;
- ``<<kill-engine>>``: such a step raises a ``BaseException``, which ends the engine thread;
- ``<<slow>>``: such a step sleeps ``SLOW_STEP`` seconds first (a long request, to fill a batch or a queue).
"""

from __future__ import annotations

import sys
import time

from elasticlm.cli import main
from elasticlm.generate import DecodeBatch
from elasticlm.tokenizer import load_tokenizer

SLOW_STEP = 0.02


class KillEngine(BaseException):
    """Not an Exception: escapes the engine's guards and ends its thread."""


def install(tokenizer) -> None:
    add, step = DecodeBatch.add, DecodeBatch.step

    def faulty_add(self, requests):
        for r in requests:
            text = tokenizer.decode(r.prompt)
            if "<<admit-fault>>" in text:
                raise RuntimeError("injected admit fault")
            r.faults = {m for m in ("step-fault", "kill-engine", "slow") if f"<<{m}>>" in text}
        return add(self, requests)

    def faulty_step(self):
        faults = set().union(*(getattr(r, "faults", set()) for r in self.rows))
        if "kill-engine" in faults:
            raise KillEngine("injected engine kill")
        if "step-fault" in faults:
            raise RuntimeError("injected step fault")
        if "slow" in faults:
            time.sleep(SLOW_STEP)
        return step(self)

    DecodeBatch.add, DecodeBatch.step = faulty_add, faulty_step


if __name__ == "__main__":
    argv = sys.argv[1:]
    install(load_tokenizer(argv[argv.index("--checkpoint") + 1]))
    sys.exit(main(argv))
