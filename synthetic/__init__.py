"""Made-up footage with ground truth: seeded street scenes (``synthetic.scene``) drawn from procedural
sprites (``synthetic.sprites``).

It feeds the ``synthetic://`` cameras, training, evaluation, the tests and the benchmarks, so it is its own
package rather than part of ``models/`` (which is the model). It needs numpy and OpenCV, no torch, and
imports nothing from ``models/``, ``workers/`` or ``pipeline/``.
"""
