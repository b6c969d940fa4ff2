"""Report benchmark: SR build and Grad-CAM capture build for one CT job (issue 11, Speed).

A synthetic 300-slice CT study (``sijnode.synth``) and a result with 8 explained slices
(a Gaussian heatmap and a peak box each) go through ``reports.build_outputs``; the
median of ``--rounds`` builds is reported for: the SR (content tree + encoding as
Comprehensive SR) and its size, one secondary capture (render + build) and its size,
uncompressed and JPEG-LS lossless, the KOS, and the whole bundle written to disk.

    .venv/bin/python bench/reports.py --slices 300 --explained 8 --rounds 5
    .venv/bin/python bench/reports.py --slices 12 --explained 2 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ComprehensiveSRStorage

from sijnode.models.result import (
    AlgorithmIdentity,
    Decision,
    Explanation,
    Finding,
    PipelineResult,
    Region,
    SliceResult,
)
from sijnode.reports.build import build_outputs, read_headers
from sijnode.reports.sc import Rendering, build_capture
from sijnode.reports.sr import SRContent, build_measurement_report, encode_sr
from sijnode.reports.uids import JobUIDs
from sijnode.settings import Settings
from sijnode.synth import generate_ct_study, write_study


def make_result(headers: list[pydicom.Dataset], n_explained: int) -> PipelineResult:
    """A positive result: random scores, ``n_explained`` evenly spread explained slices."""
    rng = np.random.default_rng(0)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    slices = tuple(
        SliceResult(
            sop_instance_uid=str(h.SOPInstanceUID),
            series_instance_uid=str(h.SeriesInstanceUID),
            position_index=i,
            instance_number=int(h.InstanceNumber),
            score=float(rng.uniform(0.6, 0.95)),
            filtered_score=None,
            positive=True,
        )
        for i, h in enumerate(headers)
    )
    r, c = np.mgrid[0:rows, 0:columns].astype(np.float32)
    blob = np.exp(-((r - rows * 0.55) ** 2 + (c - columns * 0.6) ** 2) / (2 * (rows / 25) ** 2))
    heatmap = np.rint(blob / blob.max() * 255).astype(np.uint8)
    box = Region(columns * 0.6 - 24, rows * 0.55 - 24, columns * 0.6 + 24, rows * 0.55 + 24)
    picks = np.linspace(0, len(slices) - 1, n_explained).round().astype(int) if n_explained else []
    explanations = tuple(
        Explanation(
            sop_instance_uid=slices[i].sop_instance_uid,
            series_instance_uid=slices[i].series_instance_uid,
            position_index=int(i),
            instance_number=slices[i].instance_number,
            score=slices[i].score,
            heatmap=heatmap,
            peak_region=box,
            laterality="L",
        )
        for i in picks
    )
    return PipelineResult(
        pipeline="ct",
        finding=Finding.SACROILIITIS,
        decision=Decision.PRESENT,
        probability=max(s.score for s in slices),
        threshold=0.5,
        slice_threshold=0.5,
        aggregation="max",
        aggregation_parameters={},
        study_instance_uid=str(headers[0].StudyInstanceUID),
        slices=slices,
        explanations=explanations,
        algorithm=AlgorithmIdentity("sijnode-ct-resnext50_32x4d", "ct-benchmark0000"),
        device="cpu",
        precision="fp32",
        stage_seconds={},
        laterality="L",
    )


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--explained", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    settings = Settings(reports={"kos": True})
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_study(generate_ct_study(1, 1, True, n_slices=args.slices), Path(tmp))
        paths = sorted(folder.glob("*.dcm"))
        headers = read_headers(paths)
        result = make_result(headers, args.explained)
        uids = JobUIDs(settings.node.uid_root, "bench-job")
        sources = {
            e.sop_instance_uid: pydicom.dcmread(paths[e.position_index])
            for e in result.explanations
        }
        rendering = Rendering()

        def one_capture(jpegls: bool) -> pydicom.Dataset:
            e = result.explanations[0]
            return build_capture(
                sources[e.sop_instance_uid],
                result,
                e,
                rendering,
                uids.sc_series,
                9902,
                uids.sc(1),
                jpegls=jpegls,
            )

        def sr() -> pydicom.Dataset:
            report = build_measurement_report(result, headers, uids, settings.node.ae_title)
            content = SRContent(report, tuple(headers), uids, 9901)
            return encode_sr(content, ComprehensiveSRStorage)

        out = Path(tmp) / "out"
        bundle = build_outputs(result, paths, "bench-job", settings)
        written = bundle.write(out)
        sizes = {p.name: p.stat().st_size for p in written}
        jpegls_file = Path(tmp) / "sc-jpegls.dcm"
        one_capture(True).save_as(jpegls_file, enforce_file_format=True)
        sizes["jpegls"] = jpegls_file.stat().st_size
        rows = [
            ("SR build (content + Comprehensive SR)", median_seconds(sr, args.rounds), "sr-1.dcm"),
            (
                "SC build per image (render + build)",
                median_seconds(lambda: one_capture(False), args.rounds),
                "sc-1.dcm",
            ),
            (
                "SC build per image, JPEG-LS lossless",
                median_seconds(lambda: one_capture(True), args.rounds),
                "jpegls",
            ),
            (
                f"whole bundle ({len(bundle.captures)} SC + SR + KOS) incl. reading headers",
                median_seconds(
                    lambda: build_outputs(result, paths, "bench-job", settings), args.rounds
                ),
                None,
            ),
            (
                "write the bundle",
                median_seconds(lambda: bundle.write(out), args.rounds),
                None,
            ),
        ]
    print(
        f"{args.slices}-slice CT job, {len(result.explanations)} explained slices, "
        f"median of {args.rounds}:\n"
    )
    print("| Step | Median | Size |\n| --- | --- | --- |")
    for name, seconds, file in rows:
        size = f"{sizes[file] / 1024:.0f} KiB" if file else ""
        print(f"| {name} | {seconds * 1000:.1f} ms | {size} |")


if __name__ == "__main__":
    main()
