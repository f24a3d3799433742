"""Test and demo data the project makes or fetches, outside the product: phantom chest CTs
(:mod:`synth.phantom`), a DICOM series writer (:mod:`synth.dicomio`), the LIDC-shape benchmark
builder (:mod:`synth.benchmark_data`), the real CT that packages ship (:mod:`synth.data`) and
the demo scan of ``make run`` (:mod:`synth.demo`)."""
