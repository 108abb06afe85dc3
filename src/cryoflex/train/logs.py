"""What a training run shows and records: metrics.jsonl, TensorBoard scalars and figures, and the progress display.

On a terminal the progress is a tqdm bar with the loss terms on a line of their own below it (so neither is cut at 80
columns); when stderr is not a terminal (a log file, a batch job) it is one plain line every PLAIN_INTERVAL_S.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import torch
from tqdm.auto import tqdm

from cryoflex.io.atomic import write_text_atomic
from cryoflex.model.cryosphere import CryoSphere, ModelOutput
from cryoflex.progress import PLAIN_INTERVAL_S
from cryoflex.run_dir import RunDir
from cryoflex.train.objective import IMAGE_TERM, NLL_TERM

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

# Short names of the loss terms for the progress display and log lines.
SHORT_NAMES = {
    "total": "loss", NLL_TERM: "nll", IMAGE_TERM: "1-corr", "latent_kl": "kl", "segmentation_kl": "seg",
    "continuity": "cont", "clash": "clash", "sigma_A": "width_A",
}  # fmt: skip


def format_terms(values: dict[str, float]) -> str:
    """The loss terms as one short line, e.g. 'loss 0.9512 1-corr 0.9487 kl 0.0210 seg 0.0031 cont 0.0001 ...'."""
    return " ".join(f"{SHORT_NAMES[name]} {value:.4f}" for name, value in values.items() if name in SHORT_NAMES)


def format_validation(values: dict[str, float], best: bool) -> str:
    """The validation part of an epoch line, e.g. ', val loss 0.7412 val 1-corr 0.7390 (best)' or, with the held-out
    log evidence, ', val loss 508.7160 val 1-corr 0.9418 val evidence -508.3921 (best)'; empty without one."""
    if "val_total" not in values:
        return ""
    parts = [f"val {SHORT_NAMES[name]} {values[f'val_{name}']:.4f}" for name in ("total", IMAGE_TERM)
             if f"val_{name}" in values]  # fmt: skip
    if "val_log_evidence" in values:
        parts.append(f"val evidence {values['val_log_evidence']:.4f}")
    return ", " + " ".join(parts) + (" (best)" if best else "")


class RunLogs:
    """Rank 0's records: metrics.jsonl (one line per logged step and per epoch) and TensorBoard."""

    def __init__(self, run: RunDir, resume_step: int | None = None):
        self.metrics_path = run.metrics
        self.tensorboard: SummaryWriter | None = None
        if resume_step is not None:
            drop_metrics_after(run, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events it logged after its checkpoint, as drop_metrics_after does
            purge_step = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(str(run.tensorboard), purge_step=purge_step)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            logger.warning("tensorboard is not importable: no TensorBoard logs (metrics.jsonl is still written)")

    def record(self, kind: str, epoch: int, step: int, values: dict[str, float]) -> None:
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps({"kind": kind, "epoch": epoch, "step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def figures(self, model: CryoSphere, output: ModelOutput, observed: torch.Tensor, step: int) -> None:
        """The segmentation and predicted vs observed images of the last batch, to TensorBoard."""
        if self.tensorboard is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assignment = output.assignment.detach().float().cpu().numpy()
        figure, axis = plt.subplots(figsize=(6, 2.5))
        for m in range(assignment.shape[1]):
            axis.plot(assignment[:, m], label=f"segment {m + 1}")
        axis.set_xlabel("residue (file order)")
        axis.set_ylabel("P(segment)")
        figure.tight_layout()
        self.tensorboard.add_figure("segmentation", figure, step)
        count = min(4, len(observed))

        def scaled(images: torch.Tensor) -> torch.Tensor:
            low = images.amin(dim=(1, 2), keepdim=True)
            high = images.amax(dim=(1, 2), keepdim=True)
            return ((images - low) / (high - low).clamp_min(1e-12)).unsqueeze(1)

        samples = len(output.latent) // len(observed)  # the first of each image's latent draws
        predicted = output.predicted_images(step=samples)[:count].detach().float()
        pairs = torch.cat([scaled(predicted), scaled(observed[:count].float())])
        self.tensorboard.add_images("predicted (top) vs observed (bottom)", pairs.cpu(), step)

    def close(self) -> None:
        """Flush and close TensorBoard's event file (metrics.jsonl is written line by line)."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()


def drop_metrics_after(run: RunDir, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the lines after `step`: a resumed run logs those steps again."""
    path = run.metrics
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class EpochProgress:
    """Progress through one epoch: tqdm bar plus a terms line on a terminal, else a plain line every interval_s."""

    def __init__(
        self, description: str, total_steps: int, *, enabled: bool, stream: TextIO | None = None,
        interval_s: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self.description = description
        self.total_steps = total_steps
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.interval_s = interval_s
        self.clock = clock
        self.steps = 0
        self.last_line_s = clock()
        self.bar = self.terms_line = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total_steps, desc=description, leave=False, file=self.stream, unit="step")
            self.terms_line = tqdm(total=0, bar_format="{desc}", position=1, leave=False, file=self.stream)

    def update(self, values: dict[str, float]) -> None:
        """One step done, with its loss terms."""
        self.steps += 1
        if self.bar is not None and self.terms_line is not None:
            self.terms_line.set_description_str(format_terms(values), refresh=False)
            if self.bar.update(1):  # the bar was redrawn: redraw the terms with it
                self.terms_line.refresh()
        elif self.enabled and self.clock() - self.last_line_s >= self.interval_s:
            self.last_line_s = self.clock()
            print(f"{self.description}: step {self.steps}/{self.total_steps}, {format_terms(values)}", file=self.stream)

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for bar in (self.terms_line, self.bar):
            if bar is not None:
                bar.close()
