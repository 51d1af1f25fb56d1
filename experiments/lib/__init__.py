"""The shared library of the experiments: every script in ``experiments/`` imports only this, attnjax and
pallas_kernels, never another script.

- ``measure``: compile, time (interleaved medians) and read XLA's memory analysis;
- ``host``: what a run measured on (device, CPU model, jax version) and how loaded the host was;
- ``slopes``: log-log slopes of time vs T per path, extrapolation to the next T, and their table cells;
- ``workload``: random q, k, v and the timed modes (forward, forward+backward);
- ``flops``: attention FLOPs by FlashAttention-2's convention, and a matmul of the same work;
- ``accuracy``: relative error against a reference and its pass bound per dtype;
- ``outcomes``: how a path declines or rejects inputs, and one line that records an error;
- ``cli``: flags the scripts share (lengths, shapes, outputs, ``--smoke``) and settings from flags;
- ``plots``: matplotlib without a display, and finishing a log-log figure;
- ``report``: where results go, JSON and markdown writing, markdown tables;
- ``model``: a small causal language model of ``attnjax.nn`` blocks;
- ``training``: the optax training loop, its loss and evaluation;
- ``checkpoints``: orbax checkpoints of a model and its optimizer state;
- ``mqar_data``: the MQAR task (Zoology's multi-query associative recall) as batches;
- ``mqar_runs``: train and score models on MQAR (the sweep and the main job's quick comparison);
- ``cab_patterns``: CAB's four attention patterns, checked by running every implementation;
- ``cab_efficiency``: CAB's efficiency length against softmax, and the whole CAB run;
- ``convnet``: a small convnet that takes any registered image module, its synthetic task and training.
"""
