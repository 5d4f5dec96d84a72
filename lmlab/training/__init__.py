"""Training: the loop and everything it calls.

    loop.py         `train(config)`: a loop that fits on a screen
    setup.py        model, data, optimizer, run directory; the state new or resumed
    step.py         one optimizer step: lr, forward/backward over micro-batches, clip, non-finite check
    duties.py       after each step: log, evaluate, norms, stop rules, checkpoint, signals
    finish.py       final evaluation, weights, summary.json, plot, samples
    state.py        TrainState: the counters checkpoints save and resume restores
    optim.py        AdamW (fused, 8-bit) and its parameter groups
    schedules.py    learning-rate schedules (cosine, linear, WSD, constant, plateau) and their clocks
    stops.py        stop rules: target loss, time budget, divergence
    faults.py       NaN/inf before the update: stop or skip
    signals.py      SIGINT / SIGTERM: finish the step, checkpoint, stop
    checkpoint.py   verified checkpoints (safetensors, sha256, atomic rename)
    resume.py       exact resume: what may change, what may not
    distributed.py  torchrun: DDP, FSDP2, agreed stops
    hung.py         a collective timed out: end this machine's workers that did not answer
    launcher.py     torchrun's SIGTERM grace (--shutdown-timeout) against a checkpoint's time
    fastpaths.py    compile, attention back-ends, activation checkpointing, the chunked loss
    perf.py         MFU and peak memory
    norms.py        per-layer weight / gradient / activation norms
"""
