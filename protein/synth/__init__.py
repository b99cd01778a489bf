"""Synthetic datasets in the competition layout, with images that are hard where the real ones are.

The generator exists so the whole pipeline (validation, training, gating, serving) can run
end to end without the competition images. Label sets are drawn from the real joint
distribution (`label_sets.json`, counted from the real train.csv), and each image is a densely
packed confocal-like field of cells whose green channel follows the organelles in its label set,
with the real data's confusable classes drawn alike (see render.py).

labels.py: label sets; cells.py: field geometry; render.py: pixels; png.py: encoding;
dataset.py: the competition layout on disk.
"""

from protein.synth.dataset import SynthSummary, generate_dataset, plan
from protein.synth.labels import sample_label_sets
from protein.synth.png import encode_png
from protein.synth.render import render_image

__all__ = ["SynthSummary", "encode_png", "generate_dataset", "plan", "render_image", "sample_label_sets"]
