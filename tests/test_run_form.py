"""The training flow's parameters are typed: Prefect's deployment form shows each param as a field."""

from __future__ import annotations

from flows.train_flow import train_flow
from harv_train.config import VALID_KEYS, ParamOverrides, load_config, overrides_mapping


def _schema():
    return train_flow.parameters.model_dump()


def test_every_param_is_a_typed_field_of_the_overrides_form():
    schema = _schema()
    fields = schema["definitions"]["ParamOverrides"]["properties"]
    assert list(fields) == list(VALID_KEYS)
    epochs = fields["epochs"]["anyOf"][0]
    assert epochs == {"type": "integer", "minimum": 1}
    enum = fields["model_name"]["anyOf"][0]["enum"]  # a dropdown of every supported model, defaults first
    assert enum[:3] == ["mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0"]
    assert {"resnet18", "convnext_tiny", "efficientnet_v2_s", "regnet_y_400mf"} <= set(enum)
    assert fields["distributed"]["anyOf"][0] == {"$ref": "#/definitions/DistributedOverrides"}
    assert all(field.get("description") for field in fields.values())


def test_the_form_sends_empty_fields_as_null_and_they_keep_the_params_file_value(tmp_path):
    """Submitting the form sends every field, the empty ones as null (measured in the UI)."""
    params = tmp_path / "params.yaml"
    params.write_text("epochs: 4\nlr: 0.01\ndistributed: {nnodes: 1, max_restarts: 2}\n")
    submitted = {key: None for key in VALID_KEYS} | {"epochs": 10, "distributed": {"nproc_per_node": 2,
                                                                                      "max_restarts": None}}
    cfg = load_config(params, ParamOverrides.model_validate(submitted))
    assert (cfg.epochs, cfg.lr, cfg.distributed.nproc_per_node, cfg.distributed.max_restarts) == (10, 0.01, 2, 2)
    assert overrides_mapping(ParamOverrides.model_validate(submitted)) == {"epochs": 10, "distributed": {"nproc_per_node": 2}}
