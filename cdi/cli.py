"""The ``cdi`` command.

Library commands live here; the service registers its own (``serve``, ``worker``,
``admin``, ``submit``…) through the ``cdi.commands`` entry-point group, so this package
never imports the service.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdi.errors import CdiError, InputError
from cdi.features.layout import FeatureSet
from cdi.options import DEFAULT_ALPHA
from cdi.pvalue import format_p_value
from cdi.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DTYPE, DTYPES


class ProgressBar:
    """A tqdm bar on stderr, fed with (done, total) calls.

    ``unit`` names what is counted (``img``, ``step``…); ``rate=False`` hides the rate for
    stages whose steps are not alike (a rate of "1.93 s/step" over two steps says nothing).
    """

    def __init__(self, desc: str, unit: str = "img", rate: bool = True) -> None:
        self.desc = desc
        self.unit = unit
        self.rate = rate
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            fmt = None if self.rate else "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}]"
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=True,
                             bar_format=fmt)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


#: What each audit stage counts: stages over images show a rate per image; the others count
#: steps of different lengths, so they show no rate.
STAGE_UNITS = {"validating": ("img", True), "extracting": ("img", True), "loading": ("step", False),
               "scoring": ("step", False), "testing": ("step", False)}


def _conditions_for(names: Sequence[str], captions: str | None, labels: str | None) -> list[Any] | None:
    from cdi.conditions import read_conditions

    if captions and labels:
        raise InputError("give either --captions or --labels, not both")
    if not captions and not labels:
        return None
    mapping = read_conditions(captions or labels or "", "caption" if captions else "label")
    if labels:
        missing = [n for n in names if n not in mapping]
        if missing:
            raise InputError(f"no label for {len(missing)} image(s), e.g. {missing[0]}")
    return [mapping.get(n) for n in names]


def cmd_features(args: argparse.Namespace) -> int:
    from cdi.features import FEATURE_NAMES, FeatureExtractor
    from cdi.images import ImageFile, list_image_files
    from cdi.models import load_model

    paths = list_image_files(args.images)
    if not paths:
        raise InputError(f"no image files in {args.images}")
    check_device(args.device)
    files = [ImageFile.read(p) for p in paths]
    conditions = _conditions_for([f.name for f in files], args.captions, args.labels)
    adapter = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                         allow_pickle=args.allow_pickle or None, lora=args.lora, lora_scale=args.lora_scale,
                         config=args.config, components=_components(args), resolution=args.resolution)
    extractor = FeatureExtractor(
        adapter, feature_set=args.features, seed=args.seed, batch_size=args.batch_size, precision=args.precision
    )
    result = extractor.extract_files(files, conditions, progress=ProgressBar("features"))
    for err in result.failures:
        print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
    reference_rows: list[Any] = []
    if args.reference_model:
        from cdi.audit import check_reference

        reference = load_model(args.reference_model, revision=args.reference_revision, device=args.device,
                               dtype=args.dtype, allow_pickle=args.allow_pickle or None,
                               config=args.reference_config, resolution=args.resolution)
        check_reference(adapter, reference)
        # The same seed and image hashes: the same per-image noise as the audited model's.
        ref_extractor = FeatureExtractor(
            reference, feature_set=args.features, seed=args.seed, batch_size=args.batch_size,
            precision=args.precision,
        )
        reference_rows = ref_extractor.extract_files(files, conditions, progress=ProgressBar("reference")).rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        ref_names = [f"reference_{n}" for n in FEATURE_NAMES] if args.reference_model else []
        writer.writerow(["file", "sha256", *FEATURE_NAMES, *ref_names])
        for i, row in enumerate(result.rows):
            ref_values = reference_rows[i].values if reference_rows else []
            writer.writerow([row.name, row.sha256, *(f"{v:.9g}" for v in [*row.values, *ref_values])])
    n = len(result.rows)
    print(
        f"{n} image(s) → {out} ({len(result.failures)} skipped); "
        f"{result.passes.forward / max(n, 1):.1f} forward and "
        f"{result.passes.backward / max(n, 1):.1f} backward passes per image",
        file=sys.stderr,
    )
    return 0 if n else 2


def _read_folder(folder: str) -> list[Any]:
    from cdi.images import ImageFile, list_image_files

    paths = list_image_files(folder)
    if not paths:
        raise InputError(f"no image files in {folder}")
    return [ImageFile.read(p) for p in paths]


class AuditProgress:
    """One progress bar per stage of an audit, on stderr."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar = ProgressBar("")

    def __call__(self, p: Any) -> None:
        if p.stage != self._stage:
            self._bar.close()
            self._stage = p.stage
            unit, rate = STAGE_UNITS.get(p.stage, ("step", False))
            self._bar = ProgressBar(p.stage, unit=unit, rate=rate)
        if p.total:
            self._bar(p.done, p.total)


def summary(result: Any) -> str:
    """The human-readable summary of an audit printed by ``cdi audit`` and ``cdi demo``."""
    t, v = result.test, result.verdict
    lines = [
        f"verdict        {v.outcome.value.upper()}",
        f"p-value        {format_p_value(t.p_value)} (α = {t.alpha}; {t.protocol.value} protocol, one-sided)",
        f"statistic      Welch t = {t.statistic:.3f}" + (f", df = {t.df:.1f}" if t.df is not None else ""),
        f"effect         AUC {t.auc:.3f}, Cohen's d {t.cohens_d:.2f}",
        f"images         P = {t.n_p}, U = {t.n_u} (test: {t.n_test_p} + {t.n_test_u})",
        f"neg. control   p = {v.negative_control_p:.3g}" + ("  FAILED" if v.negative_control_failed else "  ok"),
        f"distribution   AUC {v.distribution_auc:.3f}, p = {v.distribution_p:.3g}"
        + ("  SHIFT" if v.distribution_shift else "  ok"),
    ]
    n_dup = len(result.exclusion.p) + len(result.exclusion.u)
    lines.append(f"duplicates     {len(result.duplicates.groups)} group(s), {n_dup} image(s) excluded")
    lines.append(f"features       {result.forward_passes} forward passes; {result.cached_images} image(s) "
                 "read from the feature cache")
    if result.sequential is not None:
        lines.append(f"sequential     {sequential_summary(result)}")
    lines.append("")
    lines.append(v.reason)
    lines.extend(f"warning: {w}" for w in v.warnings)
    return "\n".join(lines)


def sequential_summary(result: Any) -> str:
    """One line on a sequential audit: the looks taken, why it stopped, the images used."""
    seq = result.sequential
    used = seq.n_p + seq.n_u
    total = used + len(result.unused)
    why = {"boundary": "a boundary was crossed", "futility": "futility", "final": "the last look"}[seq.stop]
    return (f"stopped at look {len(seq.looks)} of {len(seq.design.looks)} ({why}); "
            f"{used} of {total} images used ({used / total:.0%}), {len(result.unused)} never extracted")


def _signing_key(path: str | None) -> Any:
    """The key of ``--signing-key``, else the one ``CDI_SIGNING_KEY`` names, else ``None``."""
    from cdi.report import load_private_key, signing_key_from_env

    return load_private_key(path) if path else signing_key_from_env()


def _write_report(result: Any, args: argparse.Namespace, signing_key: Any) -> None:
    """Write the sealed JSON report (``--out``) and its PDF (``--pdf``), as asked."""
    if not args.out and not args.pdf:
        return
    from cdi.report import build_report, render_pdf, report_json, seal

    report = seal(build_report(result), signing_key)
    assert report.integrity is not None
    signed = f", signed by key {report.integrity.signature.key_id}" if report.integrity.signature else ""
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report_json(report), encoding="utf-8")
        print(f"report written to {path} (digest {report.integrity.digest}{signed})", file=sys.stderr)
    if args.pdf:
        path = Path(args.pdf)
        path.parent.mkdir(parents=True, exist_ok=True)
        bar = ProgressBar("figures", unit="test", rate=False)
        data = render_pdf(report, progress=lambda done, total: bar(done, total))
        bar.close()
        path.write_bytes(data)
        print(f"PDF written to {path}", file=sys.stderr)


def _audit_options(args: argparse.Namespace) -> Any:
    from cdi.audit import AuditOptions

    return AuditOptions(
        alpha=args.alpha, protocol=args.protocol, features=args.features, seed=args.seed,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, precision=args.precision,
        sequential=args.sequential, looks=args.looks, spending=args.spending, futility=args.futility,
    )


def default_report_path(folder: Path | None = None) -> Path:
    """Where ``cdi audit`` writes its report without ``--out``: ``report.json`` in the current
    folder, or ``report-2.json``, ``report-3.json``... if that is taken (never overwritten)."""
    folder = folder or Path.cwd()
    path, n = folder / "report.json", 1
    while path.exists():
        n += 1
        path = folder / f"report-{n}.json"
    return path


def cmd_audit(args: argparse.Namespace) -> int:
    from cdi.audit import audit
    from cdi.conditions import read_conditions

    options = _audit_options(args)
    check_device(args.device)
    chosen = not args.out
    if chosen:
        args.out = str(default_report_path())
    store = None
    if not args.no_cache:
        from cdi.cache import LocalFeatureStore

        store = LocalFeatureStore()
    # The key is read before any work, so that a bad key fails at once.
    signing_key = _signing_key(args.signing_key) if args.out or args.pdf else None
    published = _read_folder(args.published)
    unpublished = _read_folder(args.unpublished)
    captions = read_conditions(args.captions, "caption") if args.captions else None
    labels = read_conditions(args.labels, "label") if args.labels else None
    if chosen:  # said once the inputs are known to be usable, before the long part
        print(f"the report will be written to {args.out} (choose with --out FILE)", file=sys.stderr)
    result = audit(
        published, unpublished, args.model, revision=args.revision,
        lora=args.lora, lora_scale=args.lora_scale,
        reference_model=args.reference_model, reference_revision=args.reference_revision,
        allow_pickle=args.allow_pickle or None, config=args.config, reference_config=args.reference_config,
        components=_components(args), resolution=args.resolution,
        captions=captions, labels=labels,  # type: ignore[arg-type]
        options=options, progress=AuditProgress(), feature_store=store,
    )
    # The report first: a closed stdout (`| head`) must not lose an audit's result.
    _write_report(result, args, signing_key)
    print(summary(result))
    if store is not None:
        print(f"feature cache  {store.root} (--no-cache: neither read nor written)", file=sys.stderr)
    return 0


DEMO_MODEL = "digits-memorised"


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from cdi import zoo
    from cdi.audit import AuditOptions, audit
    from cdi.conditions import read_conditions

    try:
        model = zoo.get(args.model)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None
    if args.export:
        published, unpublished = model.export(args.export, members=args.members, held_out=args.held_out)
        root = Path(args.export)
        print(f"wrote {len(published)} member images to {root / 'published'} and "
              f"{len(unpublished)} held-out images to {root / 'unpublished'}")
        labels_option = f" --labels {root / 'labels.csv'}" if model.conditioning == "class" else ""
        print(f"try:  cdi audit --model {model.name} --published {root / 'published'} "
              f"--unpublished {root / 'unpublished'}{labels_option} --out report.json --pdf report.pdf")
        return 0
    signing_key = _signing_key(args.signing_key) if args.out or args.pdf else None
    print(f"demo: auditing {model.name} ({model.description})")
    print(f"P = {args.members} images it was trained on, U = {args.held_out} images it never saw\n")
    with tempfile.TemporaryDirectory(prefix="cdi-demo-") as tmp:
        model.export(tmp, members=args.members, held_out=args.held_out)
        labels = read_conditions(Path(tmp) / "labels.csv", "label") if model.conditioning == "class" else None
        result = audit(
            _read_folder(str(Path(tmp) / "published")), _read_folder(str(Path(tmp) / "unpublished")),
            model.name, labels=labels,  # type: ignore[arg-type]
            options=AuditOptions(seed=args.seed), progress=AuditProgress(),
        )
    # The report first: a closed stdout (`| head`) must not lose an audit's result.
    _write_report(result, args, signing_key)
    print(summary(result))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import numpy as np

    from cdi.planning import plan_audit
    from cdi.reads import columns_read, tested_columns

    options = {"alpha": args.alpha, "power": args.power, "u_ratio": args.u_ratio, "random_state": args.seed}
    if args.report:
        from cdi.report import parse_report, plan_from_report, read_document

        plan = plan_from_report(parse_report(read_document(args.report)), **options)
    else:
        if not (args.model and args.published and args.unpublished):
            raise InputError("give --report FILE, or --model with --published DIR and --unpublished DIR")
        print("note: this extracts the pilot's features; a report of an audit of these images plans in "
              "seconds: cdi plan --report report.json", file=sys.stderr)
        from cdi.features import FeatureExtractor
        from cdi.models import load_model

        # The pilot's features: those the planned (directional) audit's test reads.
        planned = argparse.Namespace(protocol="directional", features=args.features)
        columns = tested_columns(planned)
        adapter = load_model(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                             config=args.config, components=_components(args), resolution=args.resolution)
        extractor = FeatureExtractor(adapter, columns=columns_read(planned), seed=args.seed,
                                     batch_size=args.batch_size, precision=args.precision)
        pilot = []
        for folder in (args.published, args.unpublished):
            files = _read_folder(folder)
            conditions = _conditions_for([f.name for f in files], args.captions, args.labels)
            result = extractor.extract_files(files, conditions, progress=ProgressBar(f"pilot {Path(folder).name}"))
            for err in result.failures:
                print(f"skipped {err.name}: {err.reason}", file=sys.stderr)
            pilot.append(np.array([row.values for row in result.rows])[:, columns] if result.rows else
                         np.empty((0, len(columns))))
        plan = plan_audit(pilot[0], pilot[1], columns, **options)
    print(plan.summary())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cdi.report import load_public_key, read_document, verify_document

    document = read_document(args.report)
    trusted = load_public_key(args.public_key) if args.public_key else None
    v = verify_document(document, trusted)
    if v.report is not None:
        p_text = format_p_value(v.report.p_value)
        print(f"report         {v.report.schema_version}: {v.report.verdict.upper()}, p = {p_text}")
    if v.digest is not None:
        same = v.digest == v.computed_digest
        print(f"digest         {v.digest}  {'matches the content' if same else 'DOES NOT MATCH the content'}")
    if v.signature == "absent":
        print("signature      none" + ("  (a trusted key was given: FAIL)" if trusted is not None else ""))
    else:
        trust = {None: "not checked against a trusted key (use --public-key)", True: "the trusted key",
                 False: "NOT the trusted key"}[v.trusted_key]
        print(f"signature      Ed25519 by key {v.key_id}: {v.signature.upper()}; {trust}")
    for problem in v.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print("verified" if v.ok else "NOT VERIFIED")
    return 0 if v.ok else 1


def cmd_recompute(args: argparse.Namespace) -> int:
    from cdi.report import parse_report, read_document, recompute_report

    report = parse_report(read_document(args.report))
    result = recompute_report(report)
    group = None
    for c in result.checks:
        if c.group != group:
            group = c.group
            print(f"{group}:")
        mark = "ok  " if c.ok else "DIFF"
        print(f"  {mark} {c.name:34s} report {_show(c.recorded)}  recomputed {_show(c.recomputed)}")
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        print(f"recomputed: p-value {format_p_value(report.p_value)} and verdict {report.verdict.upper()} "
              "reproduced exactly")
        return 0
    print(f"NOT REPRODUCED: {len(result.failures)} value(s) differ", file=sys.stderr)
    return 1


def _show(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple) and value and all(isinstance(v, list | tuple) for v in value):
        return " + ".join(f"{len(v)} positions" for v in value)
    return str(value)


def cmd_models(args: argparse.Namespace) -> int:
    from cdi import zoo

    for m in zoo.list_models():
        kind = f"{m.image_size}px {'RGB' if m.image_channels == 3 else 'grey'}"
        conditioning = "class-conditional" if m.conditioning == "class" else "unconditional"
        print(f"{m.name:20s} {m.family:7s} {kind:9s} {conditioning:18s} {m.description}")
        print(f"{'':20s} {m.path}")
        print(f"{'':20s} {m.dataset}: {len(m.members)} members, {len(m.held_out)} held out, "
              f"denoising-loss AUC {m.manifest['measured']['dl_auc_t100']:.2f}")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model directory, hub id, shipped model name, or one .safetensors checkpoint (with --config)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--config", metavar="DIR", default=None,
                   help="for a single-file checkpoint: a local diffusers folder with its architecture's configs")
    _add_component_options(p)
    p.add_argument("--lora", metavar="FILE_OR_DIR",
                   help="LoRA to load onto the model: a .safetensors file, a peft folder, or a shipped LoRA")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="LoRA strength (default 1.0)")
    p.add_argument("--reference-model", metavar="M",
                   help="reference model (usually the base of a fine-tune): calibrate every feature against it")
    p.add_argument("--reference-revision", default=None, help="hub revision of the reference model")
    p.add_argument("--reference-config", metavar="DIR", default=None,
                   help="for a single-file reference checkpoint: its local folder of configs")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled weights (.bin, .ckpt, .pt), which run code when loaded "
                        "(also CDI_ALLOW_PICKLE=1); only for files you trust")
    _add_feature_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    p.add_argument("--captions", help="CSV (file,caption) or JSONL of captions, for text models")
    p.add_argument("--labels", help="CSV (file,label) or JSONL of class labels, for class models")


def _add_component_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unet", metavar="FILE", default=None,
                   help="a fine-tune published as its UNet alone (.safetensors): audited with --model's other "
                        "components (SD 1.x/2.x, SDXL)")
    p.add_argument("--transformer", metavar="FILE", default=None,
                   help="a fine-tune published as its transformer alone, with --model's other components (SD3, Flux)")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="Flux: the image side to audit at (default: the model's config, else 1024)")


def _components(args: argparse.Namespace) -> dict[str, str] | None:
    files = {role: getattr(args, role, None) for role in ("unet", "transformer")}
    return {role: f for role, f in files.items() if f} or None


def _batch_size(text: str) -> int | None:
    """``--batch-size``: a positive integer, or ``auto`` (sized from the accelerator's memory)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, not {text!r}")
    return value


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    from cdi.features.passes import PRECISIONS

    p.add_argument("--features", choices=[f.value for f in FeatureSet], default=FeatureSet.VERDICT.value,
                   help="verdict: only the features the verdict reads (the default of cdi audit and cdi plan); "
                        "all: the 26 (the default of cdi features); "
                        "gradient-free: the families that need no gradient")
    p.add_argument("--batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE, metavar="N|auto",
                   help=f"images per batch, or auto: sized from the accelerator's free memory "
                        f"(default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="network passes' arithmetic: fp32 (default), auto (bfloat16 on CUDA), bf16 or fp16")


def _alpha(text: str) -> float:
    from cdi.errors import InputError
    from cdi.options import check_alpha

    try:
        return check_alpha(float(text))
    except (ValueError, InputError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_audit_options(p: argparse.ArgumentParser) -> None:
    from cdi.options import DEFAULT_PROTOCOL, MAX_ALPHA, Protocol

    p.add_argument("--alpha", type=_alpha, default=DEFAULT_ALPHA,
                   help=f"significance level, 0 < α < {MAX_ALPHA} (default {DEFAULT_ALPHA})")
    p.add_argument("--protocol", choices=[p.value for p in Protocol], default=DEFAULT_PROTOCOL.value,
                   help=f"statistical test (default {DEFAULT_PROTOCOL.value}; docs/method.md compares them)")
    _add_sequential_options(p)


def _add_sequential_options(p: argparse.ArgumentParser) -> None:
    from cdi.options import MAX_LOOKS, SequentialOptions, Spending

    default = SequentialOptions()
    p.add_argument("--sequential", action="store_true", default=default.enabled,
                   help="extract and test the images in rounds, stopping once the evidence is clear (fewer "
                        "network passes; the false-positive rate stays ≤ α)")
    p.add_argument("--looks", type=int, choices=range(1, MAX_LOOKS + 1), default=default.looks, metavar="K",
                   help=f"sequential: looks, 1 to {MAX_LOOKS} (default {default.looks})")
    p.add_argument("--spending", choices=[s.value for s in Spending], default=default.spending.value,
                   help=f"sequential: how α is spent over the looks (default {default.spending.value})")
    p.add_argument("--futility", action="store_true", default=default.futility,
                   help="sequential: also stop not_detected at a look where P does not lean towards used")


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pdf", metavar="FILE", help="PDF report to write")
    p.add_argument("--signing-key", metavar="FILE",
                   help="Ed25519 private key (PEM) to sign the report with (default: $CDI_SIGNING_KEY, if set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdi", description="Copyrighted Data Identification for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("features", help="compute the 26 CDI features of a folder of images")
    _add_model_options(p)
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="CSV file to write")
    # A feature table is for studying the features: all 26 unless asked for fewer.
    p.set_defaults(func=cmd_features, features="all")

    p = sub.add_parser("plan", help="how many images an audit needs, from a pilot or an earlier report")
    p.add_argument("--report", help="an earlier report (JSON): its images are the pilot (seconds: nothing is "
                                    "extracted)")
    p.add_argument("--model", help="with --published/--unpublished: the model to compute the pilot's features on "
                                   "(minutes: prefer --report when an audit of the pilot exists)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--config", metavar="DIR", default=None,
                   help="for a single-file checkpoint: a local diffusers folder with its architecture's configs")
    _add_component_options(p)
    p.add_argument("--published", help="folder of a few published images (the pilot's P)")
    p.add_argument("--unpublished", help="folder of a few unpublished images (the pilot's U)")
    _add_feature_options(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    p.add_argument("--captions", help="CSV (file,caption) or JSONL of captions, for text models")
    p.add_argument("--labels", help="CSV (file,label) or JSONL of class labels, for class models")
    p.add_argument("--alpha", type=_alpha, default=DEFAULT_ALPHA, help="significance level of the planned audit")
    p.add_argument("--power", type=float, default=0.9, help="power to plan for (default 0.9)")
    p.add_argument("--u-ratio", type=float, default=None,
                   help="unpublished images per published image in the planned audit (default: the pilot's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("audit", help="test whether a model was trained on the published images")
    _add_model_options(p)
    _add_audit_options(p)
    p.add_argument("--published", required=True, help="folder of the published images (P)")
    p.add_argument("--unpublished", required=True, help="folder of the never-published images (U)")
    p.add_argument("--out", metavar="FILE",
                   help="JSON report to write (default: report.json in the current folder, or report-2.json... "
                        "if taken)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the local feature cache (CDI_CACHE_DIR, default "
                        "~/.cache/cdi/features): a repeat audit of the same images computes no feature otherwise")
    _add_report_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("demo", help="a complete audit on a shipped model and its own images")
    p.add_argument("--model", default=DEMO_MODEL, help=f"shipped model (default {DEMO_MODEL}; see cdi models)")
    p.add_argument("--members", type=int, default=50, help="published images: members of the training set")
    p.add_argument("--held-out", type=int, default=50, help="unpublished images: never trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON report to write")
    _add_report_options(p)
    p.add_argument("--export", metavar="DIR", help="only write the demo's images to DIR (published/, unpublished/)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("verify", help="check a JSON report's digest, signature and schema")
    p.add_argument("report", help="the JSON report")
    p.add_argument("--public-key", metavar="FILE",
                   help="the Ed25519 public key the report must be signed with (PEM, or base64 of the raw key)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("recompute", help="recompute a JSON report's test and verdict from the report alone")
    p.add_argument("report", help="the JSON report")
    p.set_defaults(func=cmd_recompute)

    p = sub.add_parser("models", help="list the models that ship with the project")
    p.set_defaults(func=cmd_models)

    for register in _plugin_registrars():
        register(sub)
    return parser


def _plugin_registrars() -> list[Callable[[Any], None]]:
    """The ``cdi.commands`` entry points: the service's commands, when its extras are installed.

    They are read from this project's own distribution first: scanning every installed
    distribution's metadata (``entry_points(group=...)``) costs most of ``cdi --help``'s time.
    """
    from importlib.metadata import PackageNotFoundError, distribution, entry_points

    try:
        found = list(distribution("cdi-audit").entry_points.select(group="cdi.commands"))
    except PackageNotFoundError:  # run from a source tree that is not installed
        found = list(entry_points(group="cdi.commands"))
    out = []
    for ep in found:
        try:
            out.append(ep.load())
        except ImportError:  # the service's extras are not installed
            continue
    return out


def _known_models() -> str:
    from cdi import zoo

    names = ", ".join(m.name for m in zoo.list_models()) or "none"
    return (f"The models that ship with the project: {names} (see `cdi models`). A model can also be a "
            "local directory in diffusers layout or a hub id (owner/name).")


def check_device(device: str) -> None:
    """Refuse a device this torch build cannot use, before any work (no traceback from deep inside torch)."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if torch.version.cuda is None:
            raise InputError(f"--device {device}: this torch build ({torch.__version__}) has no CUDA support; "
                             "use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is visible (check the driver and "
                             "CUDA_VISIBLE_DEVICES); use --device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("--device mps: Apple's MPS is not available here; use --device cpu")
        return
    raise InputError(f"--device {device!r}: unknown device; use cpu, cuda or cuda:N")


def _quiet_stdout() -> None:
    """After a closed pipe (``cdi fetch ID | head``), send what is left to /dev/null, silently."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; every failure a user can cause becomes one line on stderr, not a traceback."""
    from cdi.errors import ModelNotFoundError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except ModelNotFoundError as exc:
        print(f"error: {exc}\n{_known_models()}", file=sys.stderr)
        return 2
    except CdiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
