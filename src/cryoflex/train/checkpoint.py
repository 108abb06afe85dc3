"""Checkpoints: everything needed to continue a run exactly (model, optimiser, epoch, step, random states).

Written atomically at the end of every epoch (RUN/checkpoints/epoch_NNNN.pt, last.pt, and best.pt when the validation
score improved: the held-out evidence, or the loss with the correlation objective), so a crash or a kill leaves the
last complete epoch intact and `--resume` continues from it with the same results as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoflex.errors import CryoflexInputError, CryoflexOutputError
from cryoflex.io.atomic import atomic_path, describe_write_failure
from cryoflex.run_dir import RunDir

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def random_states(device: torch.device) -> dict[str, Any]:
    """The states of every random generator training draws from: the CPU's, and the training GPU's when it runs on
    one (not every visible GPU's: a resume may see fewer)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set every generator from random_states(). The torch states must be CPU byte tensors whatever the device:
    a checkpoint loaded with map_location="cuda" brings them back on the GPU. A checkpoint from before it kept the
    training GPU's state alone holds one per GPU then visible: the training GPU's index picks its own."""
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and device.type == "cuda":
        state = states["cuda"]
        if isinstance(state, (list, tuple)):
            index = device.index or 0
            state = state[index] if index < len(state) else None
        if state is not None:
            torch.cuda.set_rng_state(state.cpu(), device)


def save_checkpoint(run_dir: Path, state: dict[str, Any], *, best: bool = False) -> Path:
    """Write epoch_NNNN.pt and last.pt (and best.pt when `best`) atomically; returns the epoch file.

    A failed write (a full disk) raises CryoflexOutputError saying why, where, and that last.pt is still the previous
    complete checkpoint; its temporary file is removed.
    """
    run = RunDir(run_dir)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    epoch_path = run.checkpoint(state["epoch"])
    last_path = run.last_checkpoint
    then = (
        f"continue with --resume: the last checkpoint, {last_path}, is intact"
        if last_path.is_file()
        else "start the run again: no checkpoint of it was written yet"
    )
    # best.pt before last.pt: a run killed in between resumes from the previous epoch and writes both again
    for path in (epoch_path, *([run.best_checkpoint] if best else []), last_path):
        with atomic_path(path) as tmp:
            try:
                with open(tmp, "wb") as handle:
                    torch.save(payload, handle)
            except (OSError, RuntimeError) as error:  # torch reports some failed writes as a RuntimeError
                problem = f"could not write the checkpoint: {describe_write_failure(error, run.checkpoints)}"
                raise CryoflexOutputError(path, problem, f"free space there, then {then}") from error
    return epoch_path


def find_checkpoint(run_dir: Path, epoch: int | None = None) -> Path:
    """The checkpoint of `epoch` (1-based, completed epochs), or the last one."""
    if epoch is not None and epoch < 1:
        raise CryoflexInputError(run_dir, f"no epoch {epoch}: epochs are counted from 1", "give --epoch 1 or more",
                                 field="--epoch")  # fmt: skip
    path = RunDir(run_dir).checkpoint(epoch)
    if not path.is_file():
        available = [p.name for p in RunDir(run_dir).epoch_checkpoints()]
        raise CryoflexInputError(
            path, "no such checkpoint",
            f"available: {', '.join(available)}" if available else "train first (cryoflex train), or check RUN",
        )  # fmt: skip
    return path


def _numpy_globals() -> list[Any]:
    """numpy's array and scalar reconstructors and a few numeric dtypes: all a checkpoint holds besides torch's own
    types and plain Python values (numpy's random state is a uint32 array; metrics may be numpy numbers)."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy._core.multiarray._reconstruct, whatever numpy calls it
    scalar = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64, np.bool_)]
    return [np.ndarray, np.dtype, reconstruct, scalar, *dtypes]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running code: tensors, numbers, containers and numpy arrays only (weights_only)."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError) as error:  # truncated: RuntimeError, KeyError
        found = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if found is None:
            raise CryoflexInputError(
                path,
                "not a readable checkpoint (damaged or incomplete)",
                "use another of the run's checkpoints (copy RUN/checkpoints/epoch_NNNN.pt to last.pt to resume)",
            ) from error
        raise CryoflexInputError(
            path,
            f"the checkpoint contains objects other than tensors, arrays and numbers (it refers to "
            f"{found.group(1).rstrip('.,:')}); cryoflex refuses to load it, since unpickling them can run any code",
            "use a checkpoint written by cryoflex train, from a source you trust",
        ) from None
    except OSError as error:  # a zip archive cut short can fail as a read error, as can the disk
        raise CryoflexInputError(
            path, f"not a readable checkpoint (damaged, incomplete or unreadable: {error.strerror or error})",
            "use another of the run's checkpoints (copy RUN/checkpoints/epoch_NNNN.pt to last.pt to resume)",
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found_format = state.get("format") if isinstance(state, dict) else None
        raise CryoflexInputError(
            path,
            f"checkpoint format {found_format} is not {CHECKPOINT_FORMAT}",
            "use the cryoflex version that wrote it",
        )
    return state


def check_optics_groups(
    particles: Path | str, state: dict[str, Any], optics_groups: np.ndarray, *, resuming: bool
) -> None:
    """Refuse particles whose optics groups do not match the noise spectra a checkpoint learned (noise_model shells:
    one per group; the particle file changed since training): for analysis, a group it has no spectrum for, whose
    likelihood and importance weights would use another group's noise; to resume training, any other set of groups.
    Checkpoints from before the groups, and white noise, hold one spectrum for every group: nothing to check."""
    saved = state["model"].get("noise_optics_groups")
    spectra = state["model"].get("log_noise_variance")
    if saved is None or spectra is None or spectra.dim() < 2:
        return
    known, given = set(saved.tolist()), {int(g) for g in np.unique(optics_groups)}
    unknown = sorted(given - known)
    if unknown or (resuming and given != known):
        problem = (f"optics group(s) {unknown} were not" if unknown else f"optics groups {sorted(given)} are not those")
        raise CryoflexInputError(
            particles, f"{problem} in the particles the run was trained on (groups {sorted(known)}): the run learned "
            "a noise spectrum for each of those",
            fix="use the particle file the run was trained on" + (" (or train a new run)" if resuming else ""),
            field="rlnOpticsGroup",
        )  # fmt: skip


def particle_record(names: Sequence[str] | np.ndarray) -> dict[str, Any]:
    """What a checkpoint records of the particles it was trained on: their count and a digest of their names."""
    digest = hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()
    return {"count": len(names), "names_sha256": digest}


def check_particles(
    particles: Path | str, state: dict[str, Any], names: Sequence[str] | np.ndarray, *, resuming: bool
) -> None:
    """Warn when the particle file is not the one the checkpoint was trained on (rows added, removed or renamed since):
    the model then reads other particles than it learned from, which analysis and a resumed training allow but
    should say. Checkpoints from before the record: nothing to check."""
    saved = state.get("particles")
    if saved is None or particle_record(names) == saved:
        return
    logger.warning(
        "%s has %d particles, the run was trained on %d%s: the particle file changed since; %s the particles as "
        "they are now", particles, len(names), saved["count"],
        " (the same count, other names or order)" if len(names) == saved["count"] else "",
        "training goes on with" if resuming else "analysis reads",
    )  # fmt: skip


def check_likelihood_state(path: Path, state: dict[str, Any], likelihood: str) -> None:
    """Refuse a checkpoint trained with the Gaussian likelihood before its image scale was learned (earlier versions
    fitted each image's scale): its noise variance and weights belong to that other likelihood."""
    if likelihood == "gaussian" and "log_image_scale" not in state["model"]:
        raise CryoflexInputError(
            path,
            "written by an earlier cryoflex, whose Gaussian likelihood fitted every image's own scale; this version "
            "learns one scale for all images and cannot weigh this model's structures against the images",
            "train the run again with this version (or analyse it with the version that trained it)",
        )
