"""What a correct gradient-health verdict is for each variant of the seven studies (the labels the
diagnostics are calibrated against, beside the synthetic cases of
:mod:`gradsweep.train.diagnostics_cases`). ``gradsweep studies`` tabulates expected against given.

A label is the set of acceptable ``grad_health`` tags; ``None`` where we claim nothing.
"""
from __future__ import annotations

from typing import Optional

# study -> [(params the variant has, acceptable tags or None, why)]
EXPECTED: dict[str, list[tuple[dict[str, str], Optional[frozenset[str]], str]]] = {
    "srn_explosion": [
        ({"clip.name": "none"}, frozenset({"exploding,vanishing"}),
         "the norm climbs from ~13 to thousands, then rnn.U/W collapse"),
        ({"clip.name": "norm"}, frozenset({"spikes_clipped", "ok"}),
         "the same climb before clipping, bounded by clip norm 20; the recurrent gradients stay alive"),
    ],
    "mlp_vanishing": [
        ({"model.activation": "sigmoid"}, frozenset({"vanishing"}), "first layer ~1e-9 of the last"),
        ({"model.activation": "relu"}, frozenset({"ok"}), "attenuated (~2e-6) but above the threshold"),
        ({"model.activation": "leaky_relu"}, frozenset({"ok"}), "as relu: no pre-activation is negative"),
    ],
    "dead_relu": [
        ({"model.activation": "relu"}, frozenset({"vanishing,dead_units"}), "every hidden unit dead"),
        ({"model.activation": "leaky_relu"}, frozenset({"vanishing"}), "0.01 slope x 0.01 weights per layer"),
    ],
    "zero_init": [
        ({"model.activation": "relu"}, frozenset({"vanishing,dead_units"}), "zero weights: no hidden gradient"),
        ({"model.activation": "tanh"}, frozenset({"vanishing"}), "tanh(0) = 0: no hidden gradient"),
        ({"model.activation": "sigmoid"}, frozenset({"ok"}), "units move (identically)"),
    ],
    "circles_activations": [({}, frozenset({"ok"}), "converged classifiers: one-step spikes on hard minibatches only")],
    "moons_depth_lr": [
        ({}, frozenset({"ok"}), "full-batch descent; at lr 5 a few one-step spikes, no held growth"),
    ],
    "clip_value_vs_norm": [({}, frozenset({"ok"}), "the CNN's norm grows ~20x as it learns, no pathology")],
}


def expected_for(study: str, params: dict[str, str]) -> tuple[Optional[frozenset[str]], str]:
    """The first entry of ``study`` whose params all match ``params`` (a run's MLflow params)."""
    for want, tags, why in EXPECTED.get(study, []):
        if all(params.get(k) == v for k, v in want.items()):
            return tags, why
    return None, ""
