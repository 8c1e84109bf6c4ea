"""The chapter 7 job end to end: instruction fine-tuning of GPT-2 with LoRA (exercise 7.4),
or of every parameter (--full, the chapter's main run), and the model's answers.

The recipe of Raschka's chapter 7 ("Build a Large Language Model (From Scratch)"):
the book's instruction-data.json split 935 / 110 / 55 (minilora.instructions), Alpaca
prompts, batches of 8 padded per batch with every 50256 target after the first set to
-100, gpt2-medium, LoRA rank 16 alpha 16 (scaling "alpha", no /r) on every linear
including the tied LM head (7,898,384 trainable), AdamW lr 5e-5 weight decay 0.1, 2
epochs, losses every 5 steps over 5 batches, a sample answer to the first validation
entry after each epoch, then greedy answers (up to 256 new tokens, stop at 50256) to
the 110 test entries in the book's instruction-data-with-response.json.

The training loop, checkpoints, resume, history and plots are the ones of every job
(minilora.train, minilora.plots); what this job adds is its task: the masked
token-level cross-entropy over every position (minilora.layers), whose ignored
positions (-100) the data's collate has already marked, as the book does.

Run folder layout (``output_dir``):

    run_config.json   the options of the run, the sha256 of the data file (a resumed run
                      must use the same ones, but may ask for more epochs)
    .lock             held while a job writes the folder: one job at a time (minilora.run_lock)
    checkpoint/       the latest checkpoint (adapter or trained weights + optimizer + loop
                      state + manifest.json; minilora.checkpoint); its adapter/ is usable
                      on its own, as adapter/ is
    adapter/          the trained adapter (LoRA; model/ with --full: the whole model, HF layout)
    history.csv       one row per step: loss, lr, and the evaluations where made
    metrics.json      examples per split, parameter counts, final train/val/test loss (over
                      eval_iter batches, as the book's printed losses), seconds, and
                      tokens_per_second: the training tokens over the training loop's wall
                      time, its evaluations and sample answers included (strict JSON: never NaN)
    loss.png          train vs validation loss against epochs (tokens seen on top)
    instruction-data-with-response.json   each test entry plus "model_response"
"""

import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from . import layers
from .adapters import save_adapter
from .backend import resolve_device
from .errors import OptionError
from .finetune import model_reference
from .generate import generate
from .instructions import (DEFAULT_ALLOWED_MAX_LENGTH, IGNORE_INDEX, RESPONSES_FILE, format_answer, format_input,
                           load_instructions, make_instruction_loaders, write_responses)
from .lora import config_sites, select_targets
from .model import GPTModel
from .run_folder import hold_run_folder
from .tokenizer import END_OF_TEXT_ID, encode_text, get_tokenizer
from .train import CHECKPOINT_DIR, JobOptions, run_seconds, start_training, train, write_run_record
from .weights import read_config, read_heads, save_pretrained

ANSWER_MAX_NEW_TOKENS = 256  # the book's answers to the test set (chapter 7, section 7.7)
SAMPLE_MAX_NEW_TOKENS = 50  # the book's generate_and_print_sample after each epoch


@dataclass
class InstructOptions(JobOptions):
    """The chapter 7 job's options: JobOptions (model, device, LoRA, the loop, the run
    folder) with the book's defaults, and the instruction data, --max-length (the book's
    allowed_max_length), --mask-instructions (exercise 7.2) and --full."""

    model: str = "gpt2-medium"  # the book's chapter 7 model
    scaling: str = "alpha"  # exercise 7.4: alpha 16 with no /r
    epochs: int = 2
    eval_freq: int = 5
    eval_iter: int = 5
    max_length: int = DEFAULT_ALLOWED_MAX_LENGTH  # the book's allowed_max_length: inputs and targets truncated to it
    output_dir: str = "runs/chapter-7"
    data: str = None  # None: the book's instruction-data.json; else a JSON list / JSONL of {instruction, input, output}
    mask_instructions: bool = False  # exercise 7.2: the prompt's targets -100 too
    full: bool = False  # train every parameter (the chapter's main run) instead of LoRA

    RESUME_KEYS = JobOptions.RESUME_KEYS + ("data", "mask_instructions", "full")


class InstructionTask:
    """The book's chapter 7 loss: cross-entropy over the vocabulary at every position whose
    target is not -100, the mean over those positions (torch's ignore_index=-100).

    Batches are (inputs (B, T), targets (B, T)), as minilora.instructions collates them.
    loss = (1/N) sum_{(b,t): y != -100} -log softmax(logits[b, t])[y[b, t]], N the count;
    dlogits[b, t] = (softmax - onehot(y)) / N where counted, 0 where ignored.
    After each epoch: the book's sample, a greedy continuation of `sample_prompt`.
    """

    name = "instruction"
    epoch_metrics = ()

    def __init__(self, tokenizer, sample_prompt):
        self.tokenizer = tokenizer
        self.sample_prompt = sample_prompt

    def step(self, model, batch):
        inputs, targets = batch
        logits = model.forward(inputs, keep_cache=True)  # [B, T, V]
        loss, cache = layers.masked_cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX)
        (dlogits,) = layers.masked_cross_entropy_backward(1.0, cache)  # [B, T, V]
        return loss, dlogits

    def evaluate(self, model, batches):
        """The book's calc_loss_loader: the mean of the batches' losses (NaN for none)."""
        model.eval()
        losses = []
        try:
            for inputs, targets in batches:
                logits = model.forward(inputs, keep_cache=False)  # [B, T, V]
                loss = layers.masked_cross_entropy_forward(logits, targets,
                                                           ignore_index=IGNORE_INDEX)[0]  # its cache goes at once
                losses.append(float(loss))
                del logits  # with the cache gone: one logits-sized array at a time
        finally:
            model.train()
        return {"loss": float(np.mean(losses)) if losses else float("nan")}

    def end_of_epoch(self, model, train_batches, val_batches):
        """The book's generate_and_print_sample: 50 greedy tokens after the prompt, the
        decoded text on one line (no end-of-text stop, as generate_text_simple)."""
        idx = np.array([encode_text(self.tokenizer, self.sample_prompt)], dtype=np.int64)
        out = generate(model, idx, SAMPLE_MAX_NEW_TOKENS)
        return {}, self.tokenizer.decode(out[0].tolist()).replace("\n", " ")


def answer(model, tokenizer, entry, max_new_tokens=ANSWER_MAX_NEW_TOKENS):
    """The model's answer to one entry, as the book extracts it: greedy from the Alpaca
    prompt, up to max_new_tokens, stopping at <|endoftext|> (which the book's generate
    does not append, so it is dropped here), then format_answer."""
    prompt = format_input(entry)
    idx = np.array([encode_text(tokenizer, prompt)], dtype=np.int64)
    ids = generate(model, idx, max_new_tokens, eos_id=END_OF_TEXT_ID)[0].tolist()
    if len(ids) > idx.shape[1] and ids[-1] == END_OF_TEXT_ID:
        ids = ids[:-1]
    return format_answer(tokenizer.decode(ids), prompt)


def _check_model_options(opts, model_cfg):
    """Refuse, from the model's config and header alone, a --rank, --targets or
    --max-length the model cannot take, and a model this job cannot train: a classifier
    (its head answers classes, not tokens), or with --full a language model whose LM head
    is a weight of its own (minilora trains wte only as the tied head)."""
    if opts.max_length > model_cfg.context_length:
        raise OptionError(f"--max-length {opts.max_length} is longer than the context length of {opts.model} "
                          f"({model_cfg.context_length} tokens); use --max-length {model_cfg.context_length} "
                          f"or less")
    heads = read_heads(opts.model, offline=opts.offline)
    if "out_head.weight" in heads:
        raise OptionError(f"--model {opts.model}: a classifier (its head is out_head.*, e.g. a merged minilora "
                          f"classifier), not a language model: instruct trains the LM head; use the language "
                          f"model it was fine-tuned from")
    if opts.full and "lm_head.weight" in heads:
        raise OptionError(f"--model {opts.model}: its config.json says tie_word_embeddings false (the model reads "
                          f"its LM head from lm_head.weight, e.g. a merged export), and minilora trains wte only "
                          f"as the tied head: leave out --full to train LoRA adapters on it")
    if opts.full:
        return
    if opts.rank > model_cfg.emb_dim:
        raise OptionError(f"--rank {opts.rank} exceeds the width of {opts.model} ({model_cfg.emb_dim})")
    try:  # a language model: the sites include the tied head, lm_head
        select_targets(config_sites(model_cfg), model_cfg.n_layers, opts.targets)
    except ValueError as e:
        shown = opts.targets if isinstance(opts.targets, str) else ",".join(opts.targets)
        raise OptionError(f"--targets {shown!r}: {e}") from None


def load_data(opts, tokenizer, log):
    """The instruction data, split and tokenized, and its three loaders (checked: every
    text keeps a target, one full training batch at least)."""
    data = load_instructions(opts.data, tokenizer=tokenizer, offline=opts.offline)
    loaders = make_instruction_loaders(data, opts.batch_size, seed=opts.seed, allowed_max_length=opts.max_length,
                                       mask_instructions=opts.mask_instructions)
    if len(loaders[0]) == 0:  # training drops the last incomplete batch, as the book does
        raise OptionError(f"--batch-size {opts.batch_size} is larger than the {len(data.train)} training "
                          f"entries of {data.source}: not one full training batch; use a --batch-size of at "
                          f"most {len(data.train)}, or more data")
    log(f"Data: {data.source}")
    log(f"Training set length: {len(data.train)}")  # the book's three lines
    log(f"Validation set length: {len(data.val)}")
    log(f"Test set length: {len(data.test)}")
    log(f"  batches {len(loaders[0])} / {len(loaders[1])} / {len(loaders[2])} of {opts.batch_size}"
        f"{'; prompts masked (--mask-instructions)' if opts.mask_instructions else ''}")
    truncated = data.count_longer_than(opts.max_length)
    if any(truncated.values()):
        log(f"  texts longer than --max-length {opts.max_length}, truncated: {truncated}")
    return data, loaders


def build_model(opts, log):
    model = GPTModel.from_pretrained(opts.model, dtype=opts.dtype, device=opts.device, offline=opts.offline)
    log(f"Model: {opts.model} ({model.cfg.n_layers} layers, width {model.cfg.emb_dim}) on {model.device}, "
        f"{opts.dtype}; {model.num_params():,} parameters")
    return model


def final_losses(task, model, loaders, last_epoch, num_batches):
    """The mean loss over the first num_batches batches of each split (the training
    batches of the last epoch), as the book's calc_loss_loader(..., num_batches=eval_iter)
    measures the losses it prints, so the numbers compare with the published ones."""
    return {name: task.evaluate(model, islice(loader.epoch_batches(epoch), num_batches))["loss"]
            for name, loader, epoch in zip(("train", "val", "test"), loaders, (last_epoch, 0, 0))}


def run_instruct(opts, log=print, progress=None):
    """Run (or resume) the job; returns the metrics dict. `log` receives the lines to print.

    Everything that can be checked is checked before the long work: the options (when
    `opts` was made), the device, the model's configuration (from its header), the data
    (every entry, every text's targets, the batch size), the run folder
    (minilora.run_folder), which the job holds until it ends."""
    resolve_device(opts.device)  # a missing CuPy or GPU is reported before any work is done
    out = Path(opts.output_dir)
    model_cfg = read_config(opts.model, offline=opts.offline)
    _check_model_options(opts, model_cfg)
    tokenizer = get_tokenizer(offline=opts.offline, progress=progress)
    # the data before the run folder: a bad file leaves no run folder behind
    data, loaders = load_data(opts, tokenizer, log)
    with hold_run_folder(out, opts, log, "minilora instruct", data.source) as run:
        return _train_in_run_folder(opts, tokenizer, data, loaders, run, log, progress)


def _train_in_run_folder(opts, tokenizer, data, loaders, run, log, progress):
    """run_instruct's long part, while it holds the run folder (`run`: what
    minilora.run_folder prepared): the model, training, the final losses, the answers, the
    adapter (or model) and the run record; returns the metrics."""
    out = Path(opts.output_dir)
    ckpt = out / CHECKPOINT_DIR
    t0 = time.perf_counter()
    model = build_model(opts, log)
    opt, state = start_training(model, opts, ckpt, run.resume, log, full=opts.full)
    run.commit(log)  # the checkpoint has loaded: only now does run_config.json take a new --epochs
    task = InstructionTask(tokenizer, format_input(data.val.entries[0]))
    train_loader, val_loader, test_loader = loaders
    state = train(model, opt, task, train_loader, val_loader, opts.train_config(), checkpoint_dir=ckpt,
                  state=state, log=log, progress=progress,
                  adapter_settings=dict(base_model=model_reference(opts.model), max_length=opts.max_length))
    losses = final_losses(task, model, loaders, opts.epochs - 1, opts.eval_iter)
    log(f"Answering the {len(data.test)} test entries (greedy, up to {ANSWER_MAX_NEW_TOKENS} new tokens)")
    responses = [answer(model, tokenizer, entry) for entry in data.test.entries]
    write_responses(out / RESPONSES_FILE, data.test.entries, responses)
    seconds = run_seconds(state, t0)
    metrics = {
        "train_examples": len(data.train), "val_examples": len(data.val), "test_examples": len(data.test),
        "train_batches": len(train_loader), "val_batches": len(val_loader), "test_batches": len(test_loader),
        "total_params": model.num_params(), "trainable_params": model.num_params(trainable_only=True),
        "train_loss": losses["train"], "val_loss": losses["val"], "test_loss": losses["test"],
        "seconds": seconds, "training_seconds": state.seconds, "steps": state.step,
        "examples_seen": state.examples_seen, "tokens_seen": state.tokens_seen,
        # tokens_seen is None for a run resumed from a checkpoint that did not count them; the
        # loop's wall time includes its evaluations, so this is what a run delivers, not a step's rate
        "tokens_per_second": state.tokens_seen / state.seconds if state.tokens_seen and state.seconds else None,
        "truncated_texts": data.count_longer_than(opts.max_length),
        "options": asdict(opts), "device": model.device, "resumed": run.resume,
    }
    if opts.full:
        save_pretrained(model, out / "model")
    else:
        save_adapter(model, out / "adapter", base_model=model_reference(opts.model), max_length=opts.max_length)
    # the book plots chapter 7's losses against tokens seen; a run resumed from a checkpoint
    # that did not count them (None) keeps examples seen
    seen = "tokens_seen" if state.tokens_seen is not None else "examples_seen"
    write_run_record(out, state, task, len(train_loader) * opts.batch_size, metrics, seen=seen)
    log(f"Training loss: {losses['train']:.3f}")
    log(f"Validation loss: {losses['val']:.3f}")
    log(f"Test loss: {losses['test']:.3f}")
    log(f"Done in {seconds / 60:.2f} minutes; answers in {out / RESPONSES_FILE}")
    return metrics
