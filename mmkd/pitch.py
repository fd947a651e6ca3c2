"""Pitch from CREPE-style 360-bin sigmoid outputs (torchcrepe's decoding), and the metrics that
compare a student's pitch with its teacher's.

Decoding is torchcrepe's: `postprocess` with `decode.weighted_argmax` (its default Viterbi
decoder returns garbage on speech here) and torchcrepe's periodicity (the probability at the
decoded bin), fed the sigmoid probabilities exactly as `torchcrepe.predict` feeds them. The
result is predict's, quirks included: weighted_argmax applies a sigmoid again to form its
weights, and averages bin centres dithered by up to 10 cents (`bin_centres`: drawn from a
fixed seed here, so that pitch does not change from one process to the next).

The metrics follow mir_eval's definitions with the teacher as the reference: raw pitch
accuracy counts frames the teacher calls voiced (periodicity >= threshold) where the student's
pitch is within 50 cents of the teacher's; raw chroma accuracy does the same with octave errors
forgiven; voicing agreement is the fraction of all frames where both make the same voiced /
unvoiced call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

CENTS_TOLERANCE = 50.0


_CENTRES: Tensor | None = None


def bin_centres() -> Tensor:
    """torchcrepe's weighted_argmax weights: its bin centres in cents, dithered by up to 10
    cents with a draw torchcrepe takes once per process from numpy's global generator. Drawn
    here from seed 0 (numpy's state restored), so every process decodes the same pitch."""
    global _CENTRES
    if _CENTRES is None:
        import torchcrepe

        state = np.random.get_state()
        np.random.seed(0)
        try:
            _CENTRES = torchcrepe.convert.bins_to_cents(torch.arange(torchcrepe.PITCH_BINS))
        finally:
            np.random.set_state(state)
    return _CENTRES


def decode_pitch(logits: Tensor, fmin: float = 50.0, fmax: float = 2006.0) -> tuple[Tensor, Tensor]:
    """(pitch in Hz (N,), periodicity (N,)) of logits (N, 360), through torchcrepe."""
    import torchcrepe

    torchcrepe.decode.weighted_argmax.weights = bin_centres()[None, :, None]
    # postprocess writes -inf outside [fmin, fmax] into its input: give it a copy
    probabilities = torch.sigmoid(logits.detach().float().cpu()).T[None].clone()
    pitch, periodicity = torchcrepe.postprocess(
        probabilities,
        fmin,
        fmax,
        decoder=torchcrepe.decode.weighted_argmax,
        return_periodicity=True,
    )
    return pitch[0], periodicity[0]


def pitch_agreement(
    student_pitch: Tensor,
    teacher_pitch: Tensor,
    student_periodicity: Tensor,
    teacher_periodicity: Tensor,
    threshold: float = 0.5,
) -> dict[str, float]:
    """raw_pitch_accuracy, raw_chroma_accuracy (on the teacher's voiced frames; NaN when it
    has none) and voicing_agreement (on every frame) of the student against the teacher."""
    teacher_voiced = teacher_periodicity >= threshold
    student_voiced = student_periodicity >= threshold
    cents = 1200 * torch.log2(student_pitch.double() / teacher_pitch.double())
    chroma = (cents - 1200 * torch.floor(cents / 1200 + 0.5)).abs()
    voiced = int(teacher_voiced.sum())
    nan = float("nan")
    return {
        "raw_pitch_accuracy": float((cents.abs() <= CENTS_TOLERANCE)[teacher_voiced].sum()) / voiced
        if voiced
        else nan,
        "raw_chroma_accuracy": float((chroma <= CENTS_TOLERANCE)[teacher_voiced].sum()) / voiced
        if voiced
        else nan,
        "voicing_agreement": float((teacher_voiced == student_voiced).float().mean()),
        "teacher_voiced_frames": float(voiced),
    }
