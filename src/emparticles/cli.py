"""The ``emparticles`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .errors import EmparticlesError, InputError
from .units import parse_length_nm

app = typer.Typer(
    help=(
        "Particle size and shape distributions from SEM/TEM micrographs.\n\n"
        "Start with:  emparticles analyze IMAGES... -o results/\n\n"
        "Pixel sizes are read from the microscope's metadata (Zeiss, FEI/Thermo, JEOL, Hitachi, "
        "Gatan, ImageJ); when none is found, lengths stay in pixels and every output says so."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No console markup: file names and messages are printed as they are ("run[2].tif" stays whole).
# soft_wrap: lines are never broken at the console's width (80 columns when the output is a file
# or a pipe, which cut messages and paths in logs); a terminal wraps them itself.
out = Console(markup=False, soft_wrap=True)
err = Console(stderr=True, markup=False, soft_wrap=True)
ERROR = Text("error:", style="red")
WARNING = Text("warning:", style="yellow")

PixelSizeOpt = Annotated[
    str | None,
    typer.Option("--pixel-size", help="Pixel size with unit, overriding the file's metadata: 2.5nm, 25A, 0.3um, 300pm."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name (see 'emparticles models', which marks the default) or a model folder.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")]


def _flag(*names: str, **kwargs):
    """A yes/no option, shown in --help without a ``<bool>`` value it does not take."""
    return typer.Option(*names, metavar="", **kwargs)


def _pixel_size(text: str | None) -> float | None:
    return None if text is None else parse_length_nm(text)


def _settle_heap() -> None:
    """Exempt the objects made so far (modules, the model) from garbage collection: a full
    collection otherwise walks them all (about 350,000 objects with torch and pandas loaded),
    0.15 s each time it runs in the middle of a batch (not collected first: that would cost the
    same once)."""
    import gc

    gc.freeze()


def _fail(exc: EmparticlesError) -> None:
    err.print(ERROR, f"{exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _report_error(path, exc: BaseException) -> str:
    """Print one error line naming the file; return the message for the run's records."""
    from .pipeline import error_message

    message = error_message(exc)
    text = message if isinstance(exc, InputError) else f"{path}: {message}"
    err.print(ERROR, f"{text}", highlight=False, soft_wrap=True)
    return message


def _warn(path, text: str) -> None:
    err.print(WARNING, f"{path}: {text}", highlight=False, soft_wrap=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


@app.command()
def analyze(
    paths: Annotated[list[str], typer.Argument(help="Images, folders of images, or glob patterns.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    pixel_size: PixelSizeOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    edge_particles: Annotated[str, typer.Option("--edge-particles", help="Particles cut by the image border or the info bar: exclude (default; their size is unknown), keep, or miles-lantuejoul (excluded, and the others weighted to remove the bias against large particles).")] = "exclude",
    keep_edge_particles: Annotated[bool, _flag("--keep-edge-particles", help="Same as --edge-particles keep.")] = False,
    report: Annotated[bool, _flag("--report/--no-report", help="Write report.html, summary.json and plots/.")] = True,
    min_area: Annotated[str, typer.Option("--min-area", help="Drop particles smaller than this: pixels (20) or an area (100nm2).")] = "0",
    particle_size: Annotated[str | None, typer.Option("--particle-size", help="Typical particle diameter (20nm or 15px) to resample the image for the network; automatic when not given.")] = None,
    crop_bottom: Annotated[int | None, typer.Option("--crop-bottom", help="Treat the bottom N rows as the info bar (no detection).")] = None,
    scale_bar: Annotated[str, typer.Option("--scale-bar", help="auto: read the burned-in scale bar, to calibrate images without a pixel size in their metadata and to cross-check those with one; off: never.")] = "auto",
    no_infobar: Annotated[bool, _flag("--no-infobar", help="The images have no info bar: analyse every row.")] = False,
    particles: Annotated[str, typer.Option("--particles", help="any (default); bright: particles are brighter than their surroundings (SEM), so dark pits, pores and holes found as particles are left out; dark: particles are darker (TEM bright field).")] = "any",
    keep_figure_text: Annotated[bool, _flag("--keep-figure-text", help="Keep what the network finds on text drawn over the field (panel letters such as (a), scale-bar labels); left out by default.")] = False,
    overwrite: Annotated[bool, _flag("--overwrite", help="Redo images already finished in OUTPUT.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Analyse on a local dask.distributed cluster of N worker processes (the cores shared among them).", min=1)] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Analyse on the dask.distributed cluster at this address (tcp://HOST:8786); OUTPUT must be on storage every worker mounts at the same path.")] = None,
) -> None:
    """Segment and measure particles; write particles.csv, images.csv, labels/, overlays/ and run.json."""
    if workers and not scheduler:
        # the process the local workers will be forked from imports their libraries meanwhile
        from .batch import start_worker_server

        start_worker_server()
    from .models.registry import check_device_name, check_model, load_model
    from .pipeline import (
        AnalysisSettings,
        AnalyzeRun,
        analyse_path,
        find_images,
        unique_stems,
    )
    from .units import parse_area_px

    try:
        ps = _pixel_size(pixel_size)
        parse_area_px(min_area, ps if ps is not None else 1.0)  # validate the syntax early
        from .stats.edges import EDGE_MODES

        mode = "keep" if keep_edge_particles else edge_particles
        if mode not in EDGE_MODES:
            raise InputError(None, f"--edge-particles '{edge_particles}' is not a mode", f"use one of {', '.join(EDGE_MODES)}")
        from .models.registry import DEFAULT_MODEL

        settings = AnalysisSettings(model=model or DEFAULT_MODEL, pixel_size_nm=ps, crop_bottom=crop_bottom,
                                    detect_infobar=not no_infobar, edge_particles=mode,
                                    min_area=min_area, device=device, particle_size=particle_size,
                                    scale_bar=scale_bar, particles=particles, keep_figure_text=keep_figure_text)
        if scale_bar not in ("auto", "off"):
            raise InputError(None, f"--scale-bar {scale_bar!r} is not a mode", "use auto or off")
        from .instances import PARTICLE_CONTRASTS

        if particles not in PARTICLE_CONTRASTS:
            raise InputError(None, f"--particles {particles!r} is not a contrast", f"use one of {', '.join(PARTICLE_CONTRASTS)}")
        if workers and scheduler:
            raise InputError(None, "--workers and --scheduler both given", "give one: --workers starts a local cluster")
        distributed = bool(workers or scheduler)
        if distributed:  # a bad --device or --model fails here, once; the workers load the model
            check_device_name(device)  # (and find their GPU, which this machine may not have)
            check_model(settings.model)
            segmenter = None
        else:
            from .inference import device_name

            device_name(device)  # a bad --device fails here, whatever the model
            segmenter = load_model(settings.model, device)
        _settle_heap()
        run = AnalyzeRun(output, settings, overwrite=overwrite)
    except EmparticlesError as exc:
        _fail(exc)
    files, problems = find_images(paths)
    for item, message in problems:
        err.print(ERROR, f"{item}: {message}", highlight=False, soft_wrap=True)
        run.report.statuses[f"input:{item}"] = {"path": item, "status": "failed", "message": message, "warnings": []}
    names = unique_stems(files)
    with _progress() as progress:
        task = progress.add_task("analysing", total=len(files))
        if distributed:
            _analyze_on_cluster(run, files, names, settings, workers, scheduler, progress, task)
        try:
            for path, name in ([] if distributed else zip(files, names)):
                progress.update(task, description=f"analysing {path.name}")
                if run.is_done(name):
                    run.record_done(name, path)
                else:
                    try:
                        result = analyse_path(path, segmenter, settings)
                        run.save_image(name, result)
                        for w in result.warnings:
                            _warn(path, w)
                        result = None  # not held while the next image (or the exports) is worked on
                    except Exception as exc:  # noqa: BLE001 - one bad file never stops a batch
                        run.save_failure(name, path, _report_error(path, exc), getattr(exc, "known", None))
                run.combine_if_due()
                progress.advance(task)
        except KeyboardInterrupt:
            run.combine()  # the tables of every image finished so far
            _interrupted(run, output)
        progress.update(task, description="writing exports and report")
        try:
            run.finish(report=report)
        except Exception as exc:  # noqa: BLE001 - the per-image results are already safe on disk
            _report_error(output, exc)
            raise typer.Exit(1) from None
    failed = run.report.failed
    ok = len(run.report.statuses) - len(failed)
    reused = sum(bool(st.get("reused")) for st in run.report.statuses.values())
    again = f" ({reused} reused from an earlier run in this folder; --overwrite redoes them)" if reused else ""
    out.print(f"{ok} image(s) analysed{again}, {len(failed)} failed or without particles -> {output}", highlight=False)
    if failed:
        raise typer.Exit(1)


def _interrupted(run, output) -> None:
    """Ctrl-C during analyze: say what is safe and how to go on, and exit 130."""
    done = sum(st.get("status") in ("ok", "no particles") for st in run.report.statuses.values())
    err.print(WARNING, f"interrupted: {done} image(s) finished are saved in {output} (particles.csv, images.csv and "
                       "their labels, overlays and ROIs); run the same command again to go on, finished images are "
                       "reused", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _analyze_on_cluster(run, files, names, settings, workers, scheduler, progress, task) -> None:
    """The images of an ``analyze`` run on a dask.distributed cluster (:mod:`emparticles.batch`)."""
    from .batch import close_client, run_on_cluster, start_client, wait_for_workers

    def done(name, path, status) -> None:
        for w in status.get("warnings", []):
            _warn(path, w)
        if status.get("status") == "failed":
            err.print(ERROR, f"{path}: {status.get('message', '')}", highlight=False, soft_wrap=True)
        progress.advance(task)

    progress.update(task, description="starting the cluster")
    try:
        client, cluster = start_client(workers, scheduler)
    except EmparticlesError as exc:
        _fail(exc)
    try:
        if cluster is not None:
            wait_for_workers(client, int(workers))
        progress.update(task, description=f"analysing on {len(client.scheduler_info()['workers'])} workers")
        run_on_cluster(run, files, names, settings, client, done)
    except EmparticlesError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        run.combine()  # the tables of every image finished so far
        close_client(client, cluster)
        _interrupted(run, run.out)
    finally:
        close_client(client, cluster)


@app.command()
def calibrate(
    paths: Annotated[list[str], typer.Argument(help="Images, folders of images, or glob patterns.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="CSV file to write (e.g. calibration.csv).")] = None,
    crop_bottom: Annotated[int | None, typer.Option("--crop-bottom", help="Treat the bottom N rows as the info bar.")] = None,
) -> None:
    """Check the pixel size of every image before a long batch, without segmenting: from the
    metadata and from the burned-in scale bar, and whether the two agree."""
    import numpy as np
    import pandas as pd
    from rich.table import Table

    from .io.images import read_micrograph
    from .io.writers import write_csv
    from .pipeline import calibrate_from_scale_bar, find_images, locate_infobar, unique_stems

    files, problems = find_images(paths)
    for item, message in problems:
        err.print(ERROR, f"{item}: {message}", highlight=False, soft_wrap=True)
    rows, failures = [], len(problems)
    for path, name in zip(files, unique_stems(files)):
        try:
            mg = locate_infobar(read_micrograph(path), crop_bottom)
            metadata_ps, metadata_source = mg.pixel_size_nm, mg.pixel_size_source
            mg = calibrate_from_scale_bar(mg)
            sb = mg.metadata.get("scale_bar", {})
            rows.append({"image": name, "pixel_size_nm": mg.pixel_size_nm,
                         "pixel_size_source": mg.pixel_size_source or "unknown",
                         "scale_bar_value_nm": sb.get("value_nm"), "scale_bar_px": sb.get("bar_px"),
                         "scale_bar_confidence": sb.get("confidence", ""), "scale_bar_text": sb.get("text", ""),
                         "metadata_pixel_size_nm": metadata_ps, "metadata_source": metadata_source,
                         "agreement": sb.get("agreement"), "infobar_rows": mg.infobar_rows,
                         "note": "; ".join(n for n in mg.notes if "scale bar" in n) or sb.get("reason", ""),
                         "path": str(path)})
        except Exception as exc:  # noqa: BLE001 - one bad file never stops a batch
            failures += 1
            _report_error(path, exc)
    table = Table(title=f"pixel sizes of {len(rows)} image(s)")
    # the figures never wrap (a number cut over two lines misreads); names and sources fold
    table.add_column("image", overflow="fold", min_width=12, ratio=3)
    table.add_column("nm/px", no_wrap=True)
    table.add_column("source", overflow="fold", min_width=8, ratio=2)
    table.add_column("bar", overflow="fold", min_width=6, ratio=1)
    for col in ("px", "conf.", "metadata", "agree"):
        table.add_column(col, no_wrap=True)

    def num(v, fmt: str) -> str:
        return "" if v is None or np.isnan(v) else format(v, fmt)

    for r in rows:
        table.add_row(r["image"], num(r["pixel_size_nm"], ".4g"), r["pixel_size_source"], r["scale_bar_text"],
                      num(r["scale_bar_px"], ".0f"), r["scale_bar_confidence"], num(r["metadata_pixel_size_nm"], ".4g"),
                      num(r["agreement"], "+.1%"))
    # piped or redirected (a log of a batch), the table is not squeezed into 80 columns
    (out if out.is_terminal else Console(file=out.file, width=200, markup=False)).print(table)
    if output is not None and rows:
        try:
            write_csv(pd.DataFrame(rows), output)
        except OSError as exc:
            _fail(InputError(output, f"cannot be written ({exc.strerror})", "choose another -o path"))
        out.print(f"-> {output}")
    uncalibrated = sum(r["pixel_size_nm"] is None for r in rows)
    if uncalibrated:
        _warn("calibration", f"{uncalibrated} of {len(rows)} image(s) have no pixel size: give --pixel-size for them")
    if failures:
        raise typer.Exit(1)


@app.command()
def segment(
    paths: Annotated[list[str], typer.Argument(help="Images, folders of images, or glob patterns.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder for <stem>.png label images.")],
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    crop_bottom: Annotated[int | None, typer.Option("--crop-bottom", help="Treat the bottom N rows as the info bar.")] = None,
    no_infobar: Annotated[bool, _flag("--no-infobar", help="Do not look for an info bar.")] = False,
    keep_figure_text: Annotated[bool, _flag("--keep-figure-text", help="Keep what the network finds on text drawn over the field (panel letters such as (a), scale-bar labels); left out by default.")] = False,
) -> None:
    """Write 16-bit instance labels (<stem>.png, full input size, 0 = background) and scores (<stem>.json)."""
    from .io.images import read_micrograph
    from .io.writers import write_json, write_label_png
    from .models.registry import load_model
    from .pipeline import (
        find_images,
        locate_infobar,
        model_used,
        segment_micrograph,
        unique_stems,
    )

    try:
        segmenter = load_model(model, device)
        _settle_heap()
        output.mkdir(parents=True, exist_ok=True)
    except EmparticlesError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(InputError(output, f"output folder cannot be created ({exc.strerror})", "choose another -o folder"))
    files, problems = find_images(paths)
    failures = len(problems)
    for item, message in problems:
        err.print(ERROR, f"{item}: {message}", highlight=False, soft_wrap=True)
    with _progress() as progress:
        task = progress.add_task("segmenting", total=len(files))
        for path, name in zip(files, unique_stems(files)):
            try:
                mg = locate_infobar(read_micrograph(path), crop_bottom, not no_infobar)
                notes: list[str] = []
                instances, full = segment_micrograph(mg, segmenter, notes=notes, figure_text=not keep_figure_text)
                write_label_png(full, output / f"{name}.png")
                write_json({"image": str(path), "model": model_used(segmenter), "infobar_rows": mg.infobar_rows,
                            "pixel_size_nm": mg.pixel_size_nm, "pixel_size_source": mg.pixel_size_source,
                            "scores": {str(i + 1): float(s) for i, s in enumerate(instances.scores)}, "notes": notes},
                           output / f"{name}.json")
                if instances.count == 0:
                    failures += 1
                    _warn(path, "no particles found")
            except Exception as exc:  # noqa: BLE001
                failures += 1
                _report_error(path, exc)
            progress.advance(task)
    out.print(f"{len(files) + len(problems) - failures} image(s) segmented, {failures} failed or empty -> {output}")
    if failures:
        raise typer.Exit(1)


@app.command()
def measure(
    labels: Annotated[list[Path] | None, typer.Argument(help="Label images (16-bit PNG/TIFF, 0 = background).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="CSV file to write.")] = Path("particles.csv"),
    image: Annotated[Path | None, typer.Option("--image", help="The micrograph (for grey values and its pixel size); one label file or ROI set only.")] = None,
    rois: Annotated[list[Path] | None, typer.Option("--rois", help="An ImageJ ROI set (.zip from Fiji's ROI Manager, or the rois/<image>.zip of an analyze run) to measure instead of a label image; needs --image.")] = None,
    pixel_size: PixelSizeOpt = None,
) -> None:
    """Measure label images or ImageJ ROI sets made elsewhere (ImageJ definitions); one row per particle."""
    import pandas as pd

    from .io.exports import read_imagej_rois
    from .io.images import read_micrograph
    from .io.writers import read_labels, write_csv
    from .measure import measure_labels

    labels, rois = list(labels or []), list(rois or [])
    try:
        ps_user = _pixel_size(pixel_size)
        if not labels and not rois:
            raise InputError(None, "nothing to measure", "give label images, or --rois ROISET.zip --image IMAGE")
        if rois and image is None:
            raise InputError(rois[0], "an ROI set has no image size", "add --image with the micrograph the ROIs were drawn on")
        if image is not None and len(labels) + len(rois) != 1:
            raise InputError(image, "--image goes with exactly one label file or ROI set", "measure the files one at a time")
        grey_mg = read_micrograph(image) if image is not None else None
    except EmparticlesError as exc:
        _fail(exc)
    tables, failures = [], 0
    for path in labels + rois:
        try:
            if path in rois:
                lab, ps_file = read_imagej_rois(path, grey_mg.shape), None
            else:
                lab, ps_file = read_labels(path)
            grey = None
            ps = ps_user if ps_user is not None else ps_file
            if grey_mg is not None:
                if grey_mg.shape != lab.shape:
                    raise InputError(path, f"labels are {lab.shape[1]}x{lab.shape[0]} but --image is {grey_mg.shape[1]}x{grey_mg.shape[0]}", "pass the image the labels were drawn on")
                grey = grey_mg.pixels
                ps = ps if ps is not None else grey_mg.pixel_size_nm
            df = measure_labels(lab, grey, ps, image_name=(image.stem if path in rois else path.stem))
            if ps is None:
                _warn(path, "pixel size unknown, lengths in pixels (give --pixel-size)")
            if len(df) == 0:
                _warn(path, "no labelled particles")
            tables.append(df)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            _report_error(path, exc)
    if tables:
        try:
            write_csv(pd.concat(tables, ignore_index=True), output)
        except OSError as exc:
            _fail(InputError(output, f"cannot be written ({exc.strerror})", "choose another -o path"))
        out.print(f"{sum(len(t) for t in tables)} particle(s) from {len(tables)} file(s) -> {output}")
    if failures:
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by 'emparticles analyze'.")],
    measure: Annotated[str, typer.Option("--measure", help="Size measure: ecd, feret_max, feret_min or area.")] = "ecd",
    bins: Annotated[str, typer.Option("--bins", help="Histogram bins: fd (Freedman-Diaconis), sturges, auto, or a number.")] = "fd",
    log_bins: Annotated[bool, _flag("--log-bins", help="Bins of equal width in log(size).")] = False,
) -> None:
    """(Re)build report.html, summary.json and plots/ of an analyze folder from its tables."""
    from .report import build_report
    from .report.build import SIZE_MEASURES

    if not (run_dir / "run.json").exists():
        _fail(InputError(run_dir, "is not an analyze output folder (no run.json)", "pass the -o folder of 'emparticles analyze'"))
    if measure not in SIZE_MEASURES:
        _fail(InputError(None, f"--measure '{measure}' is unknown", f"use one of {', '.join(SIZE_MEASURES)}"))
    if not (bins.isdigit() or bins in ("fd", "sturges", "auto", "doane", "scott", "rice", "sqrt")):
        _fail(InputError(None, f"--bins '{bins}' is not a rule or a number", "use fd, sturges, auto or a number such as 30"))
    summary = build_report(run_dir, measure=measure, bins=bins, log_bins=log_bins)
    for w in summary["warnings"]:
        _warn(run_dir, w)
    out.print(f"report -> {run_dir / 'report.html'}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Analyze output folders (samples, batches or time points).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for compare.csv, samples.csv and d50 plots.")] = Path("comparison"),
    group_by: Annotated[Path | None, typer.Option("--group-by", help="CSV mapping image -> group (and optional time) to compare groups instead of folders.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level.")] = 0.05,
) -> None:
    """Compare ECD distributions: KS, Mann-Whitney, Welch t on log-ECD and the D50 shift with its CI."""
    import pandas as pd

    from .io.writers import write_csv, write_json
    from .report.plots import d50_trend
    from .stats import compare_sizes, describe_sizes
    from .stats.samples import size_samples

    try:
        samples, unit, times = size_samples(runs, group_by)
        if len(samples) < 2:
            raise InputError(None, f"only one sample ({next(iter(samples))})", "pass two or more folders, or a --group-by file with two or more groups")
        output.mkdir(parents=True, exist_ok=True)
    except EmparticlesError as exc:
        _fail(exc)
    rows = []
    for name, x in samples.items():
        d = describe_sizes(x, unit=unit, n_boot=2000)
        rows.append({"sample": name, "time": times.get(name), "count": d.count, "d50": d.d50.value,
                     "d50_low": d.d50.low, "d50_high": d.d50.high, "d10": d.d10.value, "d90": d.d90.value, "gsd": d.gsd})
    table = pd.DataFrame(rows)
    if times:
        table = table.sort_values("time", kind="stable").reset_index(drop=True)
    names = list(table["sample"])
    reference = names[0]
    results = []
    for name in names[1:]:
        c = compare_sizes(samples[reference], samples[name], reference, name, alpha=alpha)
        results.append({"reference": reference, "sample": name, "n_reference": c.n_a, "n_sample": c.n_b,
                        f"d50_shift_{unit}": c.d50_shift, "d50_shift_low": c.d50_shift_low, "d50_shift_high": c.d50_shift_high,
                        "d50_shift_percent": c.d50_shift_percent, "ks_statistic": c.ks_statistic, "ks_p": c.ks_p,
                        "mann_whitney_u": c.mann_whitney_u, "mann_whitney_p": c.mann_whitney_p,
                        "welch_t_log_ecd": c.welch_t, "welch_p": c.welch_p, "significant": c.significant})
        verdict = "significant" if c.significant else "not significant"
        out.print(f"{name} vs {reference}: D50 shift {c.d50_shift:+.4g} {unit} [{c.d50_shift_low:+.4g}, {c.d50_shift_high:+.4g}] "
                  f"({c.d50_shift_percent:+.1f}%); KS p={c.ks_p:.3g}, Mann-Whitney p={c.mann_whitney_p:.3g}, "
                  f"Welch p={c.welch_p:.3g}: {verdict} at alpha={alpha}", highlight=False)
    write_csv(table, output / "samples.csv")
    write_csv(pd.DataFrame(results), output / "compare.csv")
    write_json({"unit": unit, "alpha": alpha, "samples": rows, "comparisons": results}, output / "compare.json")
    fig = d50_trend(table, unit)
    fig.savefig(output / "d50.png", dpi=110)
    fig.savefig(output / "d50.svg")
    out.print(f"-> {output}")


@app.command()
def train(
    images: Annotated[Path, typer.Option("--images", help="Folder of micrographs.")],
    masks: Annotated[Path, typer.Option("--masks", help="Folder of instance masks (16-bit labels, same file stems).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder; the best model ends in OUTPUT/best.")],
    arch: Annotated[str, typer.Option("--arch", help="strided-unet, strided-unet-slim, strided-unet-lite, compact-unet, multiresunet, multiresunet-slim, unet-resnet18, unet-resnet34, deeplabv3-resnet50, maskrcnn-resnet18-fpn or maskrcnn-resnet50-fpn.")] = "strided-unet",
    epochs: Annotated[int, typer.Option("--epochs", help="Passes of --steps-per-epoch steps, each followed by validation; on two CPU cores an epoch of 100 steps takes about 5 minutes.", min=1)] = 40,
    steps_per_epoch: Annotated[int, typer.Option("--steps-per-epoch", help="Training steps between validations.", min=1)] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Augmented crops per step.", min=1)] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, one-cycle cosine; Mask R-CNN: SGD, try 1e-3).")] = 3e-3,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of the images held out for validation, whole sources on each side (sources.csv / images.csv / groups.csv beside the images folder, or the file stem without its frame number).")] = 0.15,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, _flag("--resume", help="Continue from OUTPUT/checkpoint.pt.")] = False,
    extra_images: Annotated[Path | None, typer.Option("--extra-images", help="A second annotated set used for training only, e.g. from 'emparticles synth'.")] = None,
    extra_masks: Annotated[Path | None, typer.Option("--extra-masks", help="Its masks.")] = None,
    extra_fraction: Annotated[float, typer.Option("--extra-fraction", help="Share of training crops taken from the extra set.")] = 0.3,
    paste_fraction: Annotated[float, typer.Option("--paste-fraction", help="Share of training crops made by pasting agglomerates cut from the training images (never the validation ones) on empty SEM backgrounds.")] = 0.0,
    focus_fraction: Annotated[float, typer.Option("--focus-fraction", help="Share of training crops placed so that they hold an annotated particle (the others are random); meant for sparse frames, where most random crops show bare substrate only.")] = 0.0,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Start from the weights of a model folder (fine-tuning), e.g. a shipped model.")] = None,
    average_epochs: Annotated[int, typer.Option("--average-epochs", help="The model is the mean of the weights after each of the last N epochs (stochastic weight averaging) instead of the epoch with the best validation F1, which is kept in OUTPUT/best-epoch.")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Processes that build the augmented batches; on a GPU about one per CPU core, or the GPU waits for them.")] = 0,
    distance_head: Annotated[bool, _flag("--distance-head", help="Also learn each pixel's distance to its particle's outline; the tuning then chooses the seeds that part touching particles (borders, distance or both).")] = False,
    local_contrast: Annotated[float | None, typer.Option("--local-contrast", metavar="PX", help="Put local contrast normalisation (Gaussian sigma in px at the network's scale) before the network, in training and in use; against exposure and shading that vary between frames. Default: as the --init-from model, else off.", min=0)] = None,
) -> None:
    """Train a 3-class (background/particle/border) network, or a Mask R-CNN, on your annotated images."""
    from .models.maskrcnn import MASKRCNN_ARCHITECTURES
    from .models.networks import ARCHITECTURES
    from .train.loop import TrainConfig
    from .train.loop import train as run_training

    if workers < 0:
        _fail(InputError(None, f"--workers {workers} is negative", "give 0 (batches built in the training process) or more"))
    if arch not in ARCHITECTURES and arch not in MASKRCNN_ARCHITECTURES:
        _fail(InputError(None, f"unknown architecture '{arch}'", f"use one of {', '.join([*ARCHITECTURES, *MASKRCNN_ARCHITECTURES])}"))
    if not 0.0 <= paste_fraction <= 1.0 or not 0.0 <= extra_fraction <= 1.0 or not 0.0 <= focus_fraction <= 1.0:
        _fail(InputError(None, "--paste-fraction, --extra-fraction and --focus-fraction are shares of the training crops",
                         "give values between 0 and 1"))
    if arch in MASKRCNN_ARCHITECTURES and focus_fraction:
        _fail(InputError(None, "--focus-fraction is for the semantic networks", "leave it out with a Mask R-CNN --arch"))
    if (extra_images is None) != (extra_masks is None):
        _fail(InputError(extra_images or extra_masks, "--extra-images and --extra-masks go together", "give both folders"))
    if arch in MASKRCNN_ARCHITECTURES and distance_head:
        _fail(InputError(None, "--distance-head is for the semantic networks", "leave it out with a Mask R-CNN --arch"))
    if arch in MASKRCNN_ARCHITECTURES and local_contrast:
        _fail(InputError(None, "--local-contrast is for the semantic networks", "leave it out with a Mask R-CNN --arch"))
    if arch in MASKRCNN_ARCHITECTURES:
        from .train.maskrcnn import MaskRCNNConfig, train_maskrcnn

        mcfg = MaskRCNNConfig(arch=arch, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                              lr=lr, val_fraction=val_fraction, device=device, lr_drop_epoch=max(1, int(0.75 * epochs)),
                              workers=workers, extra_images=str(extra_images or ""), extra_masks=str(extra_masks or ""),
                              extra_fraction=extra_fraction, paste_fraction=paste_fraction)
        try:
            best = train_maskrcnn(images, masks, output, mcfg, resume=resume, log=lambda m: out.print(m, highlight=False))
        except EmparticlesError as exc:
            _fail(exc)
        out.print(f"best model -> {best}  (use it with --model {best})")
        return
    cfg = TrainConfig(arch=arch, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr,
                      val_fraction=val_fraction, device=device, init_from=str(init_from or ""),
                      extra_images=str(extra_images or ""), extra_masks=str(extra_masks or ""), extra_fraction=extra_fraction,
                      paste_fraction=paste_fraction, focus_fraction=focus_fraction, average_epochs=average_epochs,
                      workers=workers, distance_head=distance_head, local_contrast_px=float(local_contrast or 0.0))
    if not 0 <= average_epochs <= epochs:
        _fail(InputError(None, f"--average-epochs {average_epochs} is not between 0 and --epochs ({epochs})", "average at most the epochs that run"))
    if init_from is not None:
        from .models.registry import MODELS, SHIPPED_DIR

        if str(init_from) in MODELS and not init_from.exists():
            cfg.init_from = str(SHIPPED_DIR / str(init_from))
        import json as _json

        base = _json.loads((Path(cfg.init_from) / "config.json").read_text()) if (Path(cfg.init_from) / "config.json").exists() else {}
        if base.get("arch") is None:
            _fail(InputError(init_from, "is not a model folder", "pass a folder with config.json and weights.safetensors"))
        cfg.arch = base["arch"]
        if local_contrast is None:
            cfg.local_contrast_px = float(base.get("local_contrast_px", 0.0))
    from rich.progress import TimeRemainingColumn

    try:
        with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("training", total=epochs * steps_per_epoch)
            best = run_training(images, masks, output, cfg, resume=resume, log=lambda m: out.print(m, highlight=False),
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    except EmparticlesError as exc:
        _fail(exc)
    out.print(f"best model -> {best}  (use it with --model {best})")


@app.command()
def finetune(
    images: Annotated[Path, typer.Option("--images", help="Folder of your micrographs.")],
    masks: Annotated[Path, typer.Option("--masks", help="Their annotations: a folder of 16-bit label images or ImageJ ROI zips (<stem>.png / <stem>.zip, as analyze writes them and Fiji saves them), or one COCO / labelme / VIA file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write; use it with --model OUTPUT.")],
    base: Annotated[str | None, typer.Option("--base", help="Model to start from (default: the default model).")] = None,
    minutes: Annotated[float, typer.Option("--minutes", help="Time budget for the whole run, loading and scoring included.", min=0.2)] = 10.0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of the decoder (the encoder gets 0.3 of it).")] = 5e-4,
    rounds: Annotated[int, typer.Option("--rounds", min=0, help="Held-out quarters to rotate through, each round training from the base without its quarter; 0: as many as the budget allows with 6 minutes of training each (one for 10 minutes; two from about 20, less for large frames, whose retuning takes longer).")] = 0,
    outlines: Annotated[str, typer.Option("--outlines", help="What your masks outline: 'particles' (one label a particle) or 'agglomerates' (touching particles under one label): the network then learns particle against substrate from them and where particles part from the base's own particles, and the held-out images are scored as agglomerates.")] = "particles",
    device: DeviceOpt = "cpu",
) -> None:
    """Adapt a model to your material from a few annotated or corrected images, within a time budget;
    the result is kept only if it beats the base on images held out of the fine-tuning."""
    from rich.progress import TimeRemainingColumn

    from .inference import pick_device
    from .train.finetune import OUTLINES, FinetuneConfig, read_annotated
    from .train.finetune import finetune as run_finetune

    cfg = FinetuneConfig(base=base or "", minutes=minutes, lr=lr, rounds=rounds, device=device, outlines=outlines)
    try:
        if outlines not in OUTLINES:
            raise InputError(None, f"--outlines {outlines!r} is not known", f"use one of: {', '.join(OUTLINES)}")
        pick_device(device)
        data = read_annotated(images, masks)
        out.print(f"{len(data)} annotated image(s); budget {minutes:g} min", highlight=False)
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), console=err, transient=True) as progress:
            task = progress.add_task("fine-tuning", total=1.0)

            def show(fraction: float, what: str) -> None:
                progress.update(task, completed=min(fraction, 1.0), description=what)

            result = run_finetune(data, output, cfg, images_dir=images, log=lambda m: out.print(m, highlight=False),
                                  progress=show)
    except EmparticlesError as exc:
        _fail(exc)
    out.print(f"{result.kept} weights in {output} ({result.seconds / 60:.1f} min); use it with --model {output}",
              highlight=False)


@app.command()
def quantise(
    model_dir: Annotated[Path, typer.Argument(help="A model folder written by 'emparticles train' (its best/ folder).")],
    images: Annotated[list[str], typer.Argument(help="Training micrographs to calibrate on: files, folders or patterns (not the images you evaluate on).")],
    count: Annotated[int, typer.Option("--count", help="Random crops of 384 px used for calibration.")] = 32,
) -> None:
    r"""Add an int8 ONNX graph to a model folder: its network runs about 1.5x faster on CPU (needs
    'pip install "emparticles\[onnx]"'). Check the accuracy afterwards with 'emparticles segment' +
    'evaluate'; delete network.onnx to undo."""
    from .io.images import read_micrograph
    from .models.onnx import quantise_model_folder
    from .pipeline import find_images, locate_infobar
    from .preprocess import normalise

    if not (model_dir / "config.json").is_file() or not (model_dir / "weights.safetensors").is_file():
        _fail(InputError(model_dir, "is not a model folder", "pass a folder with config.json and weights.safetensors"))
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        _fail(InputError(None, "quantising needs ONNX Runtime and onnx", "pip install 'emparticles[onnx]'"))
    import json as _json

    if _json.loads((model_dir / "config.json").read_text()).get("kind") in ("maskrcnn", "select"):
        _fail(InputError(model_dir, "only 3-class networks can be quantised", "pass a folder of a U-Net-family model"))
    files, problems = find_images(images)
    for item, message in problems:
        err.print(ERROR, f"{item}: {message}", highlight=False, soft_wrap=True)
    fields = []
    for path in files:
        try:
            fields.append(normalise(locate_infobar(read_micrograph(path)).analysed_pixels))
        except EmparticlesError as exc:
            _report_error(path, exc)
    if not fields:
        _fail(InputError(None, "no calibration image could be read", "give training micrographs after the model folder"))
    try:
        entry = quantise_model_folder(model_dir, fields, count=count)
    except EmparticlesError as exc:
        _fail(exc)
    out.print(f"int8 network from {len(fields)} image(s) -> {model_dir / entry['file']}")


@app.command()
def evaluate(
    gt: Annotated[Path, typer.Option("--gt", help="Folder of true instance labels.")],
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted labels (from 'emparticles segment'), same stems.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all metrics to this JSON file.")] = None,
) -> None:
    """Score predicted particles against ground truth: F1/PQ at IoU 0.5 and 0.5:0.95, IoU, Dice, COCO and
    VOC AP, matched Dice, and D10/D50/D90, KS and count agreement of the size distribution."""
    import json as _json

    import numpy as np

    from .evaluate import evaluate_dataset
    from .io.writers import read_labels, write_json
    from .pipeline import find_images

    gt_files, problems = find_images([str(gt)])
    pred_files = {p.stem: p for p in find_images([str(pred)])[0]}
    if problems or not gt_files:
        _fail(InputError(gt, "holds no label images", "pass the folder of true masks"))
    gts, preds, scores, missing = [], [], [], []
    for g in gt_files:
        p = pred_files.get(g.stem)
        if p is None:
            missing.append(g.stem)
            continue
        try:
            gl, _ = read_labels(g)
            pl, _ = read_labels(p)
        except EmparticlesError as exc:
            _fail(exc)
        side = p.with_suffix(".json")
        sc = np.ones(int(pl.max()))
        if side.exists():
            s = _json.loads(side.read_text()).get("scores", {})
            sc = np.array([s.get(str(i), 1.0) for i in range(1, int(pl.max()) + 1)], float)
        gts.append(gl)
        preds.append(pl)
        scores.append(sc)
    if missing:
        err.print(WARNING, f"no prediction for {len(missing)} image(s): {', '.join(missing[:10])}", highlight=False)
    if not gts:
        _fail(InputError(pred, "has no prediction matching the ground-truth names", "segment the same images"))
    metrics = evaluate_dataset(gts, preds, scores)
    for k, v in metrics.items():
        out.print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}", highlight=False)
    if json_out is not None:
        write_json(metrics, json_out)


@app.command()
def models() -> None:
    """List the segmentation models that can be given to --model."""
    from .models.registry import DEFAULT_MODEL, available_models

    for name, desc in available_models().items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        out.print(f"{name}{mark}: {desc}", highlight=False)


@app.command()
def synth(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for images/ and masks/ (a training set).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Number of images.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same images.")] = 0,
    width: Annotated[int, typer.Option("--width", help="Image width in pixels.", min=64)] = 1024,
    height: Annotated[int, typer.Option("--height", help="Image height in pixels, info bar included.", min=64)] = 768,
    info_bar: Annotated[float, typer.Option("--info-bar", help="Fraction of images with a microscope info bar.")] = 0.5,
    paste_images: Annotated[Path | None, typer.Option("--paste-images", help="Annotated images to cut agglomerates from.")] = None,
    paste_masks: Annotated[Path | None, typer.Option("--paste-masks", help="Their instance masks.")] = None,
    paste_fraction: Annotated[float, typer.Option("--paste-fraction", help="Fraction of images made by pasting agglomerates on empty backgrounds.")] = 0.3,
    overwrite: Annotated[bool, _flag("--overwrite", help="Redraw images that already exist.")] = False,
) -> None:
    """Generate synthetic SEM micrographs of agglomerated particles with exact instance masks."""
    from .io.datasets import write_synth_set
    from .synth import SynthSettings

    if count < 1 or width < 64 or height < 64:
        _fail(InputError(None, "-n must be >= 1 and --width/--height >= 64", "pass larger values"))
    if (paste_images is None) != (paste_masks is None):
        _fail(InputError(paste_images or paste_masks, "--paste-images and --paste-masks go together", "give both folders"))
    settings = SynthSettings(width=width, height=height, info_bar_probability=info_bar)
    paste = (paste_images, paste_masks) if paste_images is not None else None
    try:
        with _progress() as progress:
            task = progress.add_task("drawing", total=count)
            write_synth_set(output, count, seed, settings, paste, paste_fraction if paste else 0.0, overwrite,
                            progress=lambda: progress.advance(task))
    except EmparticlesError as exc:
        _fail(exc)
    out.print(f"{count} image(s) -> {output}/images, masks -> {output}/masks")


annotations_app = typer.Typer(help="Bring annotations from other tools in, and take them out, as COCO JSON.",
                              no_args_is_help=True)
app.add_typer(annotations_app, name="annotations")


@annotations_app.command("import")
def annotations_import(
    files: Annotated[list[Path], typer.Argument(help="COCO instance JSON (CVAT, Label Studio, ...), labelme JSON or VIA JSON files.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for 16-bit instance masks named like the images.")],
    images: Annotated[Path | None, typer.Option("--images", help="Folder of the annotated images (needed for VIA files).")] = None,
) -> None:
    """Write one instance mask per annotated image, ready for 'emparticles train --masks'."""
    from .io.datasets import read_annotations
    from .io.writers import write_label_png

    written, failures = 0, 0
    for f in files:
        try:
            for name, labels in read_annotations(f, images).items():
                write_label_png(labels, output / f"{Path(name).stem}.png")
                written += 1
        except EmparticlesError as exc:
            failures += 1
            err.print(ERROR, f"{exc}", highlight=False, soft_wrap=True)
        except (KeyError, ValueError, TypeError) as exc:
            failures += 1
            err.print(ERROR, f"{f}: unexpected content ({exc}); export as COCO 1.0 instances", highlight=False)
    out.print(f"{written} mask(s) -> {output}")
    if failures:
        raise typer.Exit(1)


@annotations_app.command("export")
def annotations_export(
    masks: Annotated[list[str], typer.Argument(help="Instance label images or folders of them.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="COCO instance JSON to write.")],
) -> None:
    """Write instance masks as one COCO instance JSON (RLE), e.g. to correct them in CVAT."""
    from .io.exports import write_coco
    from .io.writers import read_labels
    from .pipeline import find_images

    files, problems = find_images(masks)
    for item, message in problems:
        err.print(ERROR, f"{item}: {message}", highlight=False)
    labels = {}
    for f in files:
        try:
            labels[f.name] = read_labels(f)[0]
        except EmparticlesError as exc:
            problems.append((str(f), str(exc)))
            err.print(ERROR, f"{exc}", highlight=False, soft_wrap=True)
    if labels:
        write_coco(labels, output)
    out.print(f"{len(labels)} image(s) -> {output}")
    if problems or not labels:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    app()
