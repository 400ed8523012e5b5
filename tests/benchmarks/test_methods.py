"""The benchmarks' BYOL and SimSiam are the one definition: the lightly integration recipes
(integrations/lightly/, one-line diffs of lightly's examples) train exactly like them."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from directpred_plugin.benchmarks.methods import LightlyBYOL, LightlySimSiam

pytestmark = pytest.mark.slow  # builds two ResNet-18s per recipe

RECIPES = Path(__file__).resolve().parents[2] / "integrations" / "lightly"


def _recipe_model(name, monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"lightly_recipe_{name}_methods", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.BYOL if name == "byol" else module.SimSiam
    # what training_step reads from a Trainer: max_epochs (BYOL's momentum schedule) and logging
    monkeypatch.setattr(cls, "trainer", type("Trainer", (), {"max_epochs": 10})(), raising=False)
    monkeypatch.setattr(cls, "log", lambda self, *args, **kwargs: None)
    return cls()


@pytest.mark.parametrize("name, shared_class", [("byol", LightlyBYOL), ("simsiam", LightlySimSiam)])
def test_the_recipe_trains_like_the_shared_definition(monkeypatch, name, shared_class):
    torch.manual_seed(0)
    recipe = _recipe_model(name, monkeypatch)
    shared = shared_class(*(copy.deepcopy(part) for part in
                            (recipe.backbone, recipe.projection_head, recipe.prediction_head)))
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.06) for model in (recipe, shared)]
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x0, x1 = (torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2))
        recipe_loss = recipe.training_step(((x0, x1), None), step)
        if name == "byol":
            shared.update_target(0.996)  # cosine_schedule(epoch 0, ...): the recipe's first momentum
        shared_loss, _ = shared.training_loss(x0, x1)
        torch.testing.assert_close(shared_loss, recipe_loss)
        for optimizer, loss in zip(optimizers, (recipe_loss, shared_loss)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (key, a), (_, b) in zip(recipe.state_dict().items(), shared.state_dict().items()):
        torch.testing.assert_close(a, b, msg=key)
    assert int(shared.prediction_head.num_updates) == 2
