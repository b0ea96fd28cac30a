"""`adsearch extract`, `transcribe`, `finetune` and `cache info`: from recordings to feature caches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import TextColumn

from adsearch.cli.app import STORAGE_HELP, THREADS_HELP, app, cache_app
from adsearch.cli.console import (
    AudioSpeedColumn,
    CountProgress,
    RichExtractProgress,
    RichFinetuneProgress,
    bar,
    complete,
    err,
    out,
    print_threads,
    print_warnings,
    user_errors,
)
from adsearch.embed.model import DEFAULT_MODEL


@app.command()
def extract(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest from `adsearch corpus`.")],
    output: Annotated[Path, typer.Option("-o", "--output", "--cache-root",
                                         help="Cache root; each corpus/model/settings combination gets its own "
                                              "sub-folder (--cache-root, as in finetune).")],
    model: Annotated[str, typer.Option(help="Hugging Face id or local directory of a wav2vec2-family model.")] = (
        DEFAULT_MODEL),
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    window_s: Annotated[float, typer.Option(help="Longest window in seconds (bounds memory, attention cost).")] = 20.0,
    min_window_s: Annotated[float, typer.Option(help="Shorter speech spans are skipped.")] = 0.5,
    batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass (default: 16 on CUDA, "
                                                        "1 on CPU, where batching only costs memory).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16/fp16 on CUDA, fp32 on CPU), float32, bfloat16, "
                                            "float16.")] = "auto",
    features: Annotated[str, typer.Option(help="model: the speech model's hidden states; egemaps: openSMILE's 25 "
                                               "eGeMAPSv02 low-level descriptors per 10 ms, pooled like a layer; "
                                               "egemaps-functionals: the 88 functionals per window (with --window-s "
                                               "600: per recording), needs adsearch[egemaps]; linguistic: "
                                               "interpretable features of the --transcripts (rates, pauses, "
                                               "fillers, lexical diversity, information units); ngrams: word 1- and "
                                               "2-gram counts of the --transcripts (search them with scale: tfidf, "
                                               "fitted inside the folds); text: every layer "
                                               "of --text-model over the --transcripts.")] = "model",
    transcripts: Annotated[Path | None, typer.Option(help="Transcript folder from `adsearch transcribe` (for "
                                                          "--features linguistic or text).")] = None,
    text_model: Annotated[str | None, typer.Option(help="Hugging Face text encoder (id or save_pretrained "
                                                        "folder, BERT family) for --features text.")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: extract only the K-th of N shards (0 <= K < N) into the "
                                                   "same -o (shared file system), e.g. --shard "
                                                   "$SLURM_ARRAY_TASK_ID/8 or $JOB_COMPLETION_INDEX/8. The last "
                                                   "shard to finish consolidates the cache.")] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
) -> None:
    """Run every recording through the speech model once and cache every layer's pooled statistics.

    Participant speech is cut into windows of at most --window-s seconds; per window and layer the
    cache keeps frame count, mean, M2, max and min, from which every pooling is derived exactly.
    Interrupted runs resume where they stopped; unreadable or too-short files are reported and skipped.
    """
    from adsearch.corpus import label_conflicts, read_manifest
    from adsearch.embed.extract import ExtractSettings
    from adsearch.embed.extract import extract as run_extract
    from adsearch.work import parse_shard

    with user_errors():
        print_warnings(label_conflicts(read_manifest(manifest, check_files=False)))
    if features in ("linguistic", "ngrams", "text") or transcripts is not None or text_model is not None:
        from adsearch.embed.from_transcripts import extract_from_transcripts

        if features == "text":
            print_threads(threads)
        with user_errors(), bar() as progress:
            result = extract_from_transcripts(manifest, output, features, transcripts, text_model, device,
                                              CountProgress(progress, "features"))
            complete(progress)
        _print_extract_result(result, shard)
        return
    plan = print_threads(threads) if features == "model" else None
    with user_errors(), bar(AudioSpeedColumn()) as progress:
        result = run_extract(manifest, output, model, ExtractSettings(window_s, min_window_s, dtype),
                             batch_size=batch_size, device=device, revision=revision,
                             progress=RichExtractProgress(progress), shard=parse_shard(shard) if shard else None,
                             features=features, threads=plan)
        if not result.remaining:
            complete(progress)
    _print_extract_result(result, shard)


def _print_extract_result(result, shard: str | None) -> None:
    print_warnings(result.redone)
    if result.remaining:
        out.print(f"shard {shard} done: {result.n_computed} recording(s) extracted here; {result.remaining} of other "
                  f"shards still to go. The last shard to finish consolidates {result.cache_dir}.", highlight=False)
        return
    if result.n_computed == 0 and not result.failures:
        out.print("cache already complete, nothing to do")
    if result.failures:
        err.print(f"[yellow]{len(result.failures)} recording(s) skipped:[/]")
        for failure in result.failures:
            err.print(f"  {failure.id}  {failure.path}: {failure.reason}", highlight=False)
    out.print(f"cache: {result.cache_dir} ({result.n_items} recordings); search it with --cache {result.cache_dir}",
              highlight=False)
    if result.compute_seconds > 0 and result.audio_seconds > 0:
        out.print(f"{result.audio_seconds:,.0f} s of audio in {result.compute_seconds:,.1f} s "
                  f"({result.audio_seconds / result.compute_seconds:,.1f}x real time)")


@app.command()
def transcribe(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest from `adsearch corpus`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Transcript root; each recogniser/corpus "
                                                                "combination gets its own sub-folder.")],
    asr: Annotated[str, typer.Option(help="whisper: faster-whisper (CTranslate2); ctc: the CTC head of a "
                                          "wav2vec2-family model, e.g. the seed's own model.")] = "whisper",
    model: Annotated[str | None, typer.Option(help="whisper: a CTranslate2 model folder or a faster-whisper name "
                                                   "(default: the offline Whisper tiny.en of adsearch[asr]); ctc: a "
                                                   "Hugging Face id or folder (default: the seed's model).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
    shard: Annotated[str | None, typer.Option(help="K/N: transcribe only the K-th of N shards into the same -o; the "
                                                   "last to finish writes transcripts.json.")] = None,
    from_chat: Annotated[Path | None, typer.Option(help="Import CHAT files ({id}.cha, *PAR tier) from this "
                                                        "folder instead of running a recogniser.")] = None,
    from_csv: Annotated[Path | None, typer.Option(help="Import a CSV id,text[,words] instead of running a "
                                                       "recogniser (words: JSON [[word, start, end], ...]).")] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
    batch_size: Annotated[int, typer.Option(help="Whisper: chunks of participant speech (of several recordings) "
                                                 "decoded at once; every size gives the same words.", min=1,
                                            max=256)] = 8,
) -> None:
    """Transcribe the participant's speech of every recording once (or import transcripts you have).

    Only the manifest's participant segments are decoded. Each transcript keeps words with start, end and
    the recogniser's probability. Interrupted runs resume; unreadable or digitally silent audio is listed and
    skipped (as by `extract`); a recording in which no word is heard gets an empty transcript.
    Next: `adsearch extract MANIFEST --features linguistic --transcripts FOLDER`.
    """
    from adsearch.transcripts.imports import import_transcripts
    from adsearch.transcripts.run import transcribe as run_transcribe
    from adsearch.work import parse_shard

    with user_errors():
        if from_chat is not None or from_csv is not None:
            found = import_transcripts(manifest, output, from_chat, from_csv)
            folder, n_items, failures = found.path, len(found.meta["items"]), found.meta["failures"]
            seconds = compute = 0.0
        else:
            plan = print_threads(threads)
            with bar(AudioSpeedColumn()) as progress:
                result = run_transcribe(manifest, output, asr, model, device, parse_shard(shard) if shard else None,
                                        progress=RichExtractProgress(progress, "transcribing"), threads=plan.threads,
                                        batch_size=batch_size)
                if not result.remaining:
                    complete(progress)
            if result.remaining:
                out.print(f"shard {shard} done; {result.remaining} recording(s) of other shards still to go. The "
                          f"last shard to finish completes {result.folder}.", highlight=False)
                return
            folder, n_items, failures = result.folder, result.n_items, result.failures
            seconds, compute = result.audio_seconds, result.compute_seconds
    if failures:
        err.print(f"[yellow]{len(failures)} recording(s) without a transcript:[/]")
        for failure in failures:
            err.print(f"  {failure['id']}  {failure['path']}: {escape(failure['reason'])}", highlight=False)
    out.print(f"transcripts: {folder} ({n_items} recordings)", highlight=False)
    if compute > 0:
        out.print(f"{seconds:,.0f} s of speech in {compute:,.1f} s ({seconds / compute:,.1f}x real time)")
    out.print(f"next: adsearch extract {manifest} --features linguistic --transcripts {folder} -o CACHE_ROOT",
              highlight=False)


@app.command()
def finetune(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest (train recordings are fine-tuned on).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the fine-tuned models (fold-K/, full/) "
                                                                "and finetune.json; a rerun resumes in it.")],
    model: Annotated[str, typer.Option(help="Hugging Face id or local directory of a wav2vec2-family model.")] = (
        DEFAULT_MODEL),
    folds: Annotated[int, typer.Option(help="Speaker-grouped folds for cross-fitting.", min=2, max=20)] = 5,
    folds_from: Annotated[str | None, typer.Option(help="Take the fold assignment of this study instead (with "
                                                        "--storage).")] = None,
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    crossfit: Annotated[bool, typer.Option(help="--no-crossfit: one model on every train recording (naive; the "
                                                "cache, study note and report say CV optimistic).")] = True,
    cache_root: Annotated[Path | None, typer.Option(help="Where the cross-fitted cache goes (default: OUTPUT/cache)."
                                                    )] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs per model (early stopping may end sooner).")] = 10,
    batch_size: Annotated[int, typer.Option(help="An optimiser step takes --batch-size x --accumulate windows; on "
                                                 "the CPU --batch-size per forward pass.")] = 4,
    accumulate: Annotated[int, typer.Option(help="See --batch-size (on the CPU: passes per optimiser step, "
                                                 "gradient accumulation).")] = 2,
    micro_batch: Annotated[int, typer.Option(help="Windows per forward/backward pass. 0: on CUDA the fewest passes "
                                                  "per step that fit the card's free memory (measured on it), on "
                                                  "the CPU --batch-size. The loss is normalised over the whole "
                                                  "step, so this changes memory and speed, not the optimisation; "
                                                  "the choice is recorded in each model's done.json.")] = 0,
    checkpointing: Annotated[str, typer.Option(help="Gradient checkpointing (recompute activations in the backward "
                                                    "pass: less memory, about a third more compute): auto (only "
                                                    "when the passes do not fit without it), on, off.")] = "auto",
    encoder_lr: Annotated[float, typer.Option(help="AdamW learning rate of the transformer.")] = 3e-5,
    head_lr: Annotated[float, typer.Option(help="AdamW learning rate of the linear head.")] = 1e-3,
    freeze_layers: Annotated[int, typer.Option(help="Lower transformer layers kept frozen.")] = 0,
    window_s: Annotated[float, typer.Option(help="Training window length in seconds.")] = 10.0,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation score before stopping.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of folds, validation split, initialisation and batches.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
) -> None:
    """Fine-tune the speech model on the AD labels, cross-fitted, and extract a cache from it.

    Per fold, a model fine-tuned on the other folds extracts that fold's train recordings; a model fine-tuned
    on the whole train split extracts the test recordings (and is the one export and predict use). The cache
    records the folds and which model produced each item; a study on it uses exactly those folds. A killed
    run resumes from its last epoch; finished folds are never redone.
    """
    import optuna

    from adsearch.embed.extract import ExtractSettings
    from adsearch.finetune.crossfit import extract_crossfit
    from adsearch.finetune.crossfit import finetune as run_finetune
    from adsearch.finetune.settings import FinetuneError, FinetuneSettings

    plan = print_threads(threads)
    with user_errors():
        try:
            settings = FinetuneSettings(epochs=epochs, batch_size=batch_size, accumulate=accumulate,
                                        micro_batch=micro_batch, checkpointing=checkpointing,
                                        encoder_lr=encoder_lr, head_lr=head_lr, freeze_layers=freeze_layers,
                                        window_s=window_s, patience=patience, seed=seed)
        except FinetuneError as exc:
            raise ValueError(str(exc)) from None
        assignment = None
        if folds_from:
            from adsearch.search.storage import make_storage
            from adsearch.search.study import StudySetup

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            try:
                store = make_storage(storage, create=False)
                setup = StudySetup.from_study(optuna.load_study(study_name=folds_from, storage=store))
            except KeyError:
                raise ValueError(f"--folds-from: no study {folds_from!r} in this storage") from None
            if setup.folds.shape[0] != 1:
                raise ValueError(f"--folds-from: study {folds_from!r} uses {setup.folds.shape[0]} repeats; "
                                 "cross-fitting needs one fold assignment")
            assignment = (setup.train_ids, setup.folds[0])
        with bar(TextColumn("{task.fields[info]}")) as progress:
            record = run_finetune(manifest, model, output, settings, folds, assignment, crossfit, device,
                                  RichFinetuneProgress(progress))
        for name, done in record["models"].items():
            passes = done.get("passes")
            how = (f"; {passes['micro_batch']} window(s) per pass, checkpointing "
                   f"{'on' if passes['checkpointing'] else 'off'} ({passes['chosen']})" if passes else "")
            out.print(f"{name}: {done['epochs_run']} epoch(s), best validation balanced accuracy "
                      f"{done['best_validation']:.3f}, trained on {len(done['trained_on'])} recordings{how} -> "
                      f"{done['path']}", highlight=False)
        with bar(AudioSpeedColumn()) as progress:
            cache_dir = extract_crossfit(manifest, output, cache_root or output / "cache", ExtractSettings(),
                                         device=device, threads=plan, progress_for=lambda name: RichExtractProgress(
                                             progress, f"{name} model extracting"))
    out.print(f"cache: {cache_dir}" + ("" if crossfit else "  (CV optimistic: --no-crossfit)"), highlight=False)


@cache_app.command("info")
def cache_info(path: Annotated[Path, typer.Argument(help="Cache directory (or the extract -o root).")]) -> None:
    """Summarise a cache: model, layers, items per split and label, windows, failures."""
    from adsearch.embed import open_cache

    with user_errors():
        cache = open_cache(path)
    meta = cache.meta
    out.print(f"cache      {cache.path}", highlight=False)
    out.print(f"model      {meta['model']['name']} @ {meta['model']['revision']}", highlight=False)
    meaning = "; ".join(f"{k} = {v}" for k, v in meta["layers"].get("meaning", {}).items())
    out.print(f"layers     {cache.n_layers}, dim {cache.dim} ({meaning})", highlight=False)
    if "transcripts" in meta:
        source = meta["transcripts"]["source"]
        out.print(f"transcripts {meta['transcripts']['path']} ({source['backend']}: {source['name']})", highlight=False)
    if "feature_names" in meta:
        names = meta["feature_names"]
        more = f", ... ({len(names)} in all, in cache.json)" if len(names) > 25 else ""
        out.print(f"features   {', '.join(names[:25])}{more}", highlight=False)
    for split in ("train", "test"):
        labels = cache.labels[cache.splits == split]
        if len(labels):
            out.print(f"{split:<10} {len(labels)} recordings (AD {(labels == 1).sum()}, control {(labels == 0).sum()}, "
                      f"unlabelled {(labels == -1).sum()})")
    out.print(f"windows    {meta['n_windows']} (window {meta['settings']['window_s']} s)")
    out.print(f"failures   {len(meta['failures'])}")
    out.print(f"hash       {cache.content_hash[:16]}")
