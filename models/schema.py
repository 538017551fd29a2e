"""The JSON Schema of the definitions, so editors can complete and check them."""
from __future__ import annotations

from pydantic import TypeAdapter

from .spec import Document


def json_schema() -> dict:
    schema = TypeAdapter(Document).json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://fleetwright.io/schemas/v1alpha1.json"
    schema["title"] = "fleetwright definitions (fleetwright.io/v1alpha1)"
    return schema
