"""The training engine and the one evaluation: what main.py runs between loading the data and writing the run.

One training image: the loader's micro-batch (datasets/loader.py) -> train.py `micro_batches` (on the device) ->
train.py `train_one_step` (fetch, freeze, then `train_step`: forward, models/loss.py, backward, one optimiser update
with the lr of optim.py `lr_factor`; then the schedule, the EMA of ema.py, the step count of state.py).
One validation image: evaluate.py `evaluate` -> `detect_batch` (the model in eval mode, decoded boxes ->
models/postprocess.py: NMS, back to original pixels) -> COCO rows, gathered from every rank -> datasets/coco_eval.py
(pycocotools' 12 numbers). validation.py calls the same `evaluate`; detect.py and batch_overfit.py the same
`detect_batch`.

    state.py     what a checkpoint holds: TrainState, the RNG states, Trainer (model, loss, optimiser, schedule,
                 precision, EMA), train.amp -> autocast dtype
    train.py     micro-batches, one optimiser step read top to bottom, the divergence counter
    optim.py     parameter groups, optimiser, lr schedule (Darknet's burn-in, steps, cosine with restarts)
    ema.py       the weights' moving average
    evaluate.py  detect_batch, predict, evaluate; the form training evaluates in; the predictions picture
    budget.py    train.time_limit: the run's step count fitted to its minutes
    progress.py  the log line and TensorBoard scalars every logging.every steps

Step convention used throughout: `step` is the 0-based index of an optimiser update, so step 0 is the very first
update. The training loop calls `optimizer.step()` and then `scheduler.step()` once per optimiser step, so
`scheduler.last_epoch` is always the index of the next update and its lr is `train_cfg.lr * lr_factor(that index)`.
"""
