"""Benchmarks of giblet, behind ``giblet bench``:

* ``giblet.bench.ops``: the native ops against their baselines (time and peak extra memory);
* ``giblet.bench.train_step``: the model's training step with the native ops and with the references;
* ``giblet.bench.data``: reading random batches of windows from a prepared store;
* ``giblet.bench.lesion``: the atlas lesion sweep against separate ``--roi`` runs;
* ``giblet.bench.audio``: a store's mel turned back into sound (spectral convergence and seconds).

``benchmarks/`` runs the same cases under pytest-benchmark. The layering: this package may
import giblet's other layers (config, ops, data, linear, models, train, eval); only the command
line and ``benchmarks/`` import it. Nothing is imported here: each module is loaded on its
own (a memory probe, ``python -m giblet.bench --probe``, loads the op cases only).
"""
