"""Benchmark explanation speed on your own model and hardware: ``flaxcam bench`` and :func:`run`.

    import flaxcam.bench
    records = flaxcam.bench.run(model="mypackage.models:build", methods="gradcam,scorecam", batches="1,32")

The machinery (also behind the repository's ``python -m benchmarks``): :mod:`flaxcam.bench.runner`
starts one worker process per library and configuration (:mod:`flaxcam.bench.worker`) and times every
candidate interleaved, round by round, ending each timing when the result is ready;
:mod:`flaxcam.bench.report` turns the records into ratios, a Markdown table and a chart;
:mod:`flaxcam.bench.models` loads the model a worker runs; :mod:`flaxcam.bench.torch_ref` builds the
PyTorch peers' models (the ``parity`` extra; flaxcam itself never imports torch). See docs/bench.md.
"""

from flaxcam.bench.command import registry_methods, run

__all__ = ["registry_methods", "run"]
