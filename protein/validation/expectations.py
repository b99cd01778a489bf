"""Custom Great Expectations that compute their own metric and decide in their own `_validate`.

GX evaluates these, not Python before it: each has a metric provider that reads the batch
(counts of label cells, moments of an image statistic, train/test pairs with the same pixels),
a `_validate` that turns the metric into a verdict with the numbers behind it, and renderers so
Data Docs say what the rule is (prescriptive) and, for a failure, which class or statistic moved,
its reference and current value, the adjusted p-value and the files involved (diagnostic).

- `expect_label_shares_within_reference_bounds` (column aggregate over canonical labels): the
  two-proportion z-test with Holm of `protein.validation.drift`, per class and labels-per-image share.
- `expect_image_statistic_within_reference_bounds` (column aggregate over one per-image statistic):
  the statistic's mean against the reference's bounds.
- `expect_no_content_overlap_between_splits` (table): no test image has a train image's pixels.
- `expect_no_near_duplicate_images` (table): no test image is a near copy of a train image, and no
  train image of another (64-bit difference hashes within `max_distance` bits; a warning).
- `expect_png_to_decode`: the decoder's per-image verdict (a map check over a column the image
  pass fills: the decoder, not GX, is what training uses, so its verdict is the one that counts).

Classes are created once per process inside `custom_expectations()`: importing GX costs seconds
and the library must not pay it at import time; GX registers each class and metric by name.
"""

from __future__ import annotations

import functools
from typing import Any

from protein.validation.config import MAX_EXAMPLES
from protein.validation.gx_loading import import_great_expectations

LABEL_COUNTS_METRIC = "column.protein_label_cell_counts"
MOMENTS_METRIC = "column.protein_moments"
OVERLAP_METRIC = "table.protein_cross_split_content"
NEAR_DUPLICATES_METRIC = "table.protein_near_duplicates"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


@functools.cache
def custom_expectations() -> dict[str, type]:  # noqa: C901 - one closure per GX class, defined once
    import_great_expectations()
    import great_expectations.expectations as gxe
    import numpy as np
    from great_expectations.core.metric_domain_types import MetricDomainTypes
    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import BatchExpectation, ColumnAggregateExpectation
    from great_expectations.expectations.metrics.column_aggregate_metric_provider import (
        ColumnAggregateMetricProvider,
        column_aggregate_value,
    )
    from great_expectations.expectations.metrics.metric_provider import metric_value
    from great_expectations.expectations.metrics.table_metric_provider import TableMetricProvider
    from great_expectations.render import RenderedStringTemplateContent, RenderedTableContent
    from great_expectations.render.components import LegacyDiagnosticRendererType, LegacyRendererType
    from great_expectations.render.renderer.renderer import renderer

    from protein.validation.drift import CELLS, compare_counts, image_statistic_test, label_counts, moments
    from protein.validation.neardup import near_duplicates

    def text(template: str, params: dict[str, Any]) -> list[Any]:
        return [RenderedStringTemplateContent(content_block_type="string_template", string_template={
            "template": template, "params": params, "styling": {"params": {k: {"classes": ["badge", "badge-secondary"]}
                                                                           for k in params}}})]

    def table(header: list[str], rows: list[list[Any]], title: str) -> Any:
        # A list: GX appends it to the expectation's cell.
        return [RenderedTableContent(content_block_type="table", header=title, header_row=header, table=rows,
                                     styling={"body": {"classes": ["table-bordered", "table-sm", "mt-3"]}})]

    class ObservedValueShown:
        """Data Docs' "observed value" cell shows the summary each `_validate` writes (GX's default
        would print the raw details dict). A mixin: GX registers every renderer a class has, inherited too."""

        @classmethod
        @renderer(renderer_type=LegacyDiagnosticRendererType.OBSERVED_VALUE)
        def _observed_value_renderer(cls, configuration: Any = None, result: Any = None, **kwargs: Any) -> str:
            return str((result.result or {}).get("observed_value", "--")) if result else "--"

    class LabelCellCounts(ColumnAggregateMetricProvider):
        """Images per class and per labels-per-image bucket, from canonical label strings."""

        metric_name = LABEL_COUNTS_METRIC

        @column_aggregate_value(engine=PandasExecutionEngine)
        def _pandas(cls, column: Any, **kwargs: Any) -> dict[str, Any]:
            labels = [v for v in column.tolist() if isinstance(v, str)]
            return {"n": len(labels), "counts": [int(c) for c in label_counts(labels)]}

    class ColumnMoments(ColumnAggregateMetricProvider):
        metric_name = MOMENTS_METRIC

        @column_aggregate_value(engine=PandasExecutionEngine)
        def _pandas(cls, column: Any, **kwargs: Any) -> dict[str, Any]:
            return moments(np.asarray(column.dropna().astype(float)))

    class CrossSplitContent(TableMetricProvider):
        """(test file, train file) pairs whose decoded pixels have the same SHA-256."""

        metric_name = OVERLAP_METRIC

        @metric_value(engine=PandasExecutionEngine)
        def _pandas(cls, execution_engine: Any, metric_domain_kwargs: dict, metric_value_kwargs: dict,
                    metrics: dict, runtime_configuration: dict) -> list[dict[str, str]]:
            df, _, _ = execution_engine.get_compute_domain(domain_kwargs=metric_domain_kwargs,
                                                           domain_type=MetricDomainTypes.TABLE)
            hashed = df[df["content_sha256"].notna()]
            train: dict[str, str] = {}
            for digest, file in zip(hashed.loc[hashed["split"] == "train", "content_sha256"],
                                    hashed.loc[hashed["split"] == "train", "file"], strict=True):
                train.setdefault(digest, file)
            test = hashed[hashed["split"] == "test"]
            return [{"test": file, "train": train[digest], "row": None if row != row else int(row)}
                    for digest, file, row in zip(test["content_sha256"], test["file"], test["row"], strict=True)
                    if digest in train]

    class NearDuplicatePairs(TableMetricProvider):
        """Pairs of decoded, non-blank images whose difference hashes are at most max_distance bits
        apart but whose pixels differ (same pixels: the exact-content checks' business), per scope:
        a test image near a train image, and two train images. Count and the closest examples."""

        metric_name = NEAR_DUPLICATES_METRIC
        value_keys = ("max_distance",)

        @metric_value(engine=PandasExecutionEngine)
        def _pandas(cls, execution_engine: Any, metric_domain_kwargs: dict, metric_value_kwargs: dict,
                    metrics: dict, runtime_configuration: dict) -> dict[str, dict]:
            df, _, _ = execution_engine.get_compute_domain(domain_kwargs=metric_domain_kwargs,
                                                           domain_type=MetricDomainTypes.TABLE)
            return near_duplicates(df, int(metric_value_kwargs["max_distance"]))

    class ExpectLabelSharesWithinReferenceBounds(ObservedValueShown, ColumnAggregateExpectation):
        """Every class share and labels-per-image share of these rows lies within the reference's
        sample-size-aware bounds (two-proportion z-test, Holm over the 14 shares, effect floor)."""

        # No defaults: GX leaves fields at their default out of the configuration renderers read.
        reference_shares: list[float]
        reference_n: int
        reference_source: str
        alpha: float
        min_relative_change: float
        min_absolute_change: float
        window: str

        metric_dependencies = (LABEL_COUNTS_METRIC,)
        success_keys = ("reference_shares", "reference_n", "alpha", "min_relative_change", "min_absolute_change")
        args_keys = ("column",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                      execution_engine: Any = None) -> dict[str, Any]:
            observed = metrics[LABEL_COUNTS_METRIC]
            cells = compare_counts(np.array(observed["counts"]), observed["n"], np.array(self.reference_shares),
                                   self.reference_n, self.alpha, self.min_relative_change, self.min_absolute_change)
            drifted = [c for c in cells if c["drifted"]]
            summary = (f"{len(drifted)} of {len(CELLS)} shares outside the bounds, n={observed['n']:,}: "
                       + ", ".join(f"{c['name']} {_percent(c['reference'])} -> {_percent(c['observed'])}"
                                   for c in drifted) if drifted
                       else f"all {len(CELLS)} shares within the bounds, n={observed['n']:,}")
            return {"success": not drifted, "result": {"observed_value": summary, "details": {
                "n": observed["n"], "window": self.window, "drifted": drifted, "cells": cells}}}

        @classmethod
        @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
        def _prescriptive_renderer(cls, configuration: Any = None, result: Any = None,
                                   runtime_configuration: dict | None = None, **kwargs: Any) -> list[Any]:
            kw = (configuration or result.expectation_config).kwargs
            return text("Label drift ($window): each class share and labels-per-image share must match the "
                        "$source: flagged when a Holm-corrected two-proportion z-test gives "
                        "p <= $alpha and the share moved by at least $relative of its reference value or "
                        "$absolute points, whichever is smaller",
                        {"window": kw.get("window"), "source": kw.get("reference_source"),
                         "reference_n": kw.get("reference_n"), "alpha": kw.get("alpha"),
                         "relative": f"{100 * kw.get('min_relative_change', 0):.0f} %",
                         "absolute": f"{100 * kw.get('min_absolute_change', 0):.0f}"})

        @classmethod
        @renderer(renderer_type=LegacyDiagnosticRendererType.UNEXPECTED_TABLE)
        def _unexpected_table_renderer(cls, configuration: Any = None, result: Any = None, **kwargs: Any) -> Any:
            details = ((result.result or {}).get("details") or {}) if result else {}
            drifted = details.get("drifted") or []
            if not drifted:
                return None
            rows = [[c["check"], c["name"], _percent(c["reference"]), _percent(c["observed"]),
                     f"{100 * (c['observed'] - c['reference']):+.1f}", c["p_adjusted"]] for c in drifted]
            return table(["cell", "class", "reference share", "current share", "change (points)",
                          "adjusted p (Holm)"], rows, f"Shares that drifted ({details.get('window')})")

    class ExpectImageStatisticWithinReferenceBounds(ObservedValueShown, ColumnAggregateExpectation):
        """The mean over images of one per-image statistic lies within the reference's bounds."""

        reference_mean: float
        reference_std: float
        reference_n: int
        tests: int
        alpha: float
        min_relative_change: float

        metric_dependencies = (MOMENTS_METRIC,)
        success_keys = ("reference_mean", "reference_std", "reference_n", "tests", "alpha", "min_relative_change")
        args_keys = ("column",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                      execution_engine: Any = None) -> dict[str, Any]:
            m = metrics[MOMENTS_METRIC]
            verdict = image_statistic_test(m["mean"], m["std"], m["n"], self.reference_mean, self.reference_std,
                                           self.reference_n, self.tests, self.alpha, self.min_relative_change)
            summary = (f"mean {verdict['mean']:.4f} over {m['n']:,} images; bounds {verdict['lower']:.4f} to "
                       f"{verdict['upper']:.4f} (reference {self.reference_mean:.4f}); adjusted p="
                       f"{verdict['p_adjusted']}")
            return {"success": not verdict["drifted"], "result": {"observed_value": summary,
                                                                   "details": {"statistic": self.column, **verdict}}}

        @classmethod
        @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
        def _prescriptive_renderer(cls, configuration: Any = None, result: Any = None,
                                   runtime_configuration: dict | None = None, **kwargs: Any) -> list[Any]:
            kw = (configuration or result.expectation_config).kwargs
            return text("Image statistics drift: the mean of $column over the images must match the reference "
                        "($reference_mean over $reference_n images): flagged when a two-sample z-test gives "
                        "p <= $alpha (Bonferroni over $tests statistics) and the mean moved by at least $relative",
                        {"column": kw.get("column"), "reference_mean": round(kw.get("reference_mean", 0), 4),
                         "reference_n": kw.get("reference_n"), "alpha": kw.get("alpha"), "tests": kw.get("tests"),
                         "relative": f"{100 * kw.get('min_relative_change', 0):.0f} %"})

    class ExpectNoContentOverlapBetweenSplits(ObservedValueShown, BatchExpectation):
        """No test image has the decoded pixel content of a train image (leakage)."""

        metric_dependencies = (OVERLAP_METRIC,)
        success_keys = ()
        domain_keys = ("batch_id",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                      execution_engine: Any = None) -> dict[str, Any]:
            pairs = metrics[OVERLAP_METRIC]
            summary = (f"{len(pairs):,} test images have a train image's pixels" if pairs
                       else "no test image has a train image's pixels")
            # No unexpected_count: GX's default unexpected statement would then want per-row percentages.
            return {"success": not pairs, "result": {"observed_value": summary, "details": {
                "count": len(pairs), "pairs": pairs[:MAX_EXAMPLES]}}}

        @classmethod
        @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
        def _prescriptive_renderer(cls, configuration: Any = None, result: Any = None,
                                   runtime_configuration: dict | None = None, **kwargs: Any) -> list[Any]:
            return text("Leakage: no test image may have the decoded pixels (SHA-256) of a train image", {})

        @classmethod
        @renderer(renderer_type=LegacyDiagnosticRendererType.UNEXPECTED_TABLE)
        def _unexpected_table_renderer(cls, configuration: Any = None, result: Any = None, **kwargs: Any) -> Any:
            pairs = (((result.result or {}).get("details") or {}).get("pairs") or []) if result else []
            if not pairs:
                return None
            return table(["test file", "train file with the same pixels"], [[p["test"], p["train"]] for p in pairs],
                         "Files involved")

    class ExpectNoNearDuplicateImages(ObservedValueShown, BatchExpectation):
        """No two images (a test and a train image, or two train images) are near copies: difference
        hashes at most max_distance bits apart. A warning: a near copy may be a legitimate second
        field of the same sample, but a person should look."""

        max_distance: int
        between: str  # "train and test" or "within train"

        metric_dependencies = (NEAR_DUPLICATES_METRIC,)
        success_keys = ("max_distance", "between")
        domain_keys = ("batch_id",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                      execution_engine: Any = None) -> dict[str, Any]:
            found = metrics[NEAR_DUPLICATES_METRIC][self.between]
            count = found["count"]
            summary = (f"{count:,} near-duplicate pairs {self.between} (dHash within {self.max_distance} bits)"
                       if count else f"no near-duplicate pairs {self.between} (dHash within {self.max_distance} bits)")
            return {"success": not count, "result": {"observed_value": summary, "details": {
                "between": self.between, "max_distance": self.max_distance, "count": count,
                "near_pairs": found["pairs"]}}}

        @classmethod
        @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
        def _prescriptive_renderer(cls, configuration: Any = None, result: Any = None,
                                   runtime_configuration: dict | None = None, **kwargs: Any) -> list[Any]:
            kw = (configuration or result.expectation_config).kwargs
            return text("Near-duplicates ($between): no two images may have 64-bit difference hashes (dHash) at "
                        "most $max_distance bits apart unless their pixels are identical (those are exact "
                        "duplicates, checked separately)", {"between": kw.get("between"),
                                                            "max_distance": kw.get("max_distance")})

        @classmethod
        @renderer(renderer_type=LegacyDiagnosticRendererType.UNEXPECTED_TABLE)
        def _unexpected_table_renderer(cls, configuration: Any = None, result: Any = None, **kwargs: Any) -> Any:
            details = ((result.result or {}).get("details") or {}) if result else {}
            pairs = details.get("near_pairs") or []
            if not pairs:
                return None
            return table(["file", "near copy of", "Hamming distance (of 64 bits)"],
                         [[p["file"], p["near"], p["distance"]] for p in pairs],
                         f"Closest pairs ({details.get('between')}), of {details.get('count'):,}")

    class ExpectPngToDecode(gxe.ExpectColumnValuesToBeInSet):
        """Every image decodes with protein.data.decode_png, the decoder training uses."""

        description: str = ("PNG integrity: every chunk matches its CRC, the file ends at its IEND chunk, and "
                            "protein.data.decode_png (the decoder training and prediction use) decodes every pixel")

    return {"expect_png_to_decode": ExpectPngToDecode,
            "expect_label_shares_within_reference_bounds": ExpectLabelSharesWithinReferenceBounds,
            "expect_image_statistic_within_reference_bounds": ExpectImageStatisticWithinReferenceBounds,
            "expect_no_content_overlap_between_splits": ExpectNoContentOverlapBetweenSplits,
            "expect_no_near_duplicate_images": ExpectNoNearDuplicateImages}
