"""The start's "Model:" line names a checkpoint's attribute heads and re-ID too: they showed only in their outputs
(or in --summary-json), so an operator could not tell from the start which model's features were running."""

from __future__ import annotations

from pathlib import Path

from models.metadata import read_metadata
from pipeline.app import App, model_extras
from pipeline.config import parse_config

DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"


def test_the_demo_models_attribute_and_reid_are_named():
    assert model_extras(read_metadata(DEMO)["config"]) == (
        ", attribute kind (sedan, hatch, van) of vehicles: car, re-ID of people, vehicles")


def test_a_model_without_them_adds_nothing():
    assert model_extras({"heads": {"people": {}}, "attributes": None, "reid": None, "adapters": None}) == ""


def test_the_check_of_the_model_keeps_them_for_the_line():
    app = App(parse_config({"model": {"checkpoint": str(DEMO)}, "cameras": []}), say=lambda text: None)
    app.check_model()
    assert "attribute kind" in app.model_extras and "re-ID of people, vehicles" in app.model_extras
