"""Static metadata documents: processes, collections, file formats."""

from __future__ import annotations

from typing import Any

__all__ = ["API_VERSION", "BACKEND_VERSION", "COLLECTIONS", "FILE_FORMATS", "PROCESSES", "collection_summary"]

API_VERSION = "1.2.0"
BACKEND_VERSION = "0.1.0-simulator"

_RASTER = {"type": "object", "subtype": "datacube"}
_ANY: dict[str, Any] = {}


def _param(name: str, description: str, schema: Any, optional: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "description": description, "schema": schema}
    if optional:
        doc["optional"] = True
    return doc


def _process(pid: str, summary: str, parameters: list[dict[str, Any]], returns: Any = _RASTER) -> dict[str, Any]:
    return {
        "id": pid,
        "summary": summary,
        "description": summary,
        "categories": [],
        "parameters": parameters,
        "returns": {"description": summary, "schema": returns},
    }


_DATA = _param("data", "A data cube.", _RASTER)
_REDUCER = _param("reducer", "A reducer.", {"type": "object", "subtype": "process-graph"})
_NUMBERS = _param("data", "An array of numbers.", {"type": "array"})
_XY = [_param("x", "First operand.", {"type": ["number", "null"]}), _param("y", "Second operand.", _ANY)]

PROCESSES: list[dict[str, Any]] = [
    _process(
        "load_collection",
        "Load a collection",
        [
            _param("id", "Collection id.", {"type": "string", "subtype": "collection-id"}),
            _param("spatial_extent", "Bounding box.", {"type": ["object", "null"]}),
            _param("temporal_extent", "Temporal interval.", {"type": ["array", "null"]}),
            _param("bands", "Bands to load.", {"type": ["array", "null"]}, optional=True),
            _param("properties", "Metadata filters.", {"type": "object"}, optional=True),
        ],
    ),
    _process(
        "save_result",
        "Save processed data",
        [
            _DATA,
            _param("format", "Output file format.", {"type": "string", "subtype": "output-format"}),
            _param("options", "Format options.", {"type": "object"}, optional=True),
        ],
        returns={"type": "boolean"},
    ),
    _process(
        "ndvi",
        "Normalized Difference Vegetation Index",
        [
            _DATA,
            _param("nir", "NIR band name.", {"type": "string"}, optional=True),
            _param("red", "Red band name.", {"type": "string"}, optional=True),
            _param("target_band", "Target band name.", {"type": ["string", "null"]}, optional=True),
        ],
    ),
    _process(
        "reduce_dimension",
        "Reduce dimensions",
        [_DATA, _REDUCER, _param("dimension", "Dimension name.", {"type": "string"})],
    ),
    _process("filter_bbox", "Spatial filter using a bounding box", [_DATA, _param("extent", "Bbox.", _ANY)]),
    _process(
        "filter_temporal",
        "Temporal filter based on temporal intervals",
        [_DATA, _param("extent", "Interval.", _ANY)],
    ),
    _process("filter_bands", "Filter the bands by names", [_DATA, _param("bands", "Band names.", _ANY)]),
    _process("apply", "Apply a process to each value", [_DATA, _param("process", "A process.", _ANY)]),
    _process("mean", "Arithmetic mean (average)", [_NUMBERS], returns={"type": ["number", "null"]}),
    _process("median", "Statistical median", [_NUMBERS], returns={"type": ["number", "null"]}),
    _process("max", "Maximum value", [_NUMBERS], returns={"type": ["number", "null"]}),
    _process("min", "Minimum value", [_NUMBERS], returns={"type": ["number", "null"]}),
    _process("add", "Addition of two numbers", _XY, returns={"type": ["number", "null"]}),
    _process("subtract", "Subtraction of two numbers", _XY, returns={"type": ["number", "null"]}),
    _process("multiply", "Multiplication of two numbers", _XY, returns={"type": ["number", "null"]}),
    _process("divide", "Division of two numbers", _XY, returns={"type": ["number", "null"]}),
    _process(
        "array_element",
        "Get an element from an array",
        [_NUMBERS, _param("index", "Index.", {"type": "integer"}, optional=True)],
        returns=_ANY,
    ),
    _process(
        "linear_scale_range",
        "Linear transformation between two ranges",
        [_param("x", "Value.", _ANY), *(_param(n, n, {"type": "number"}) for n in ("inputMin", "inputMax"))],
        returns={"type": ["number", "null"]},
    ),
]

_S2_BANDS = [
    {"name": "B02", "common_name": "blue", "center_wavelength": 0.49},
    {"name": "B03", "common_name": "green", "center_wavelength": 0.56},
    {"name": "B04", "common_name": "red", "center_wavelength": 0.665},
    {"name": "B08", "common_name": "nir", "center_wavelength": 0.842},
]

_S2_EXTENT = {
    "spatial": {"bbox": [[-180.0, -56.0, 180.0, 83.0]]},
    "temporal": {"interval": [["2015-07-06T00:00:00Z", None]]},
}

COLLECTIONS: dict[str, dict[str, Any]] = {
    "SENTINEL2_L2A": {
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/datacube/v2.2.0/schema.json"],
        "id": "SENTINEL2_L2A",
        "title": "Sentinel-2 L2A (simulated)",
        "description": "Simulated Sentinel-2 Level-2A surface reflectance.",
        "license": "proprietary",
        "keywords": ["Sentinel-2", "simulated"],
        "providers": [{"name": "prefect-openeo simulator", "roles": ["host"]}],
        "extent": _S2_EXTENT,
        "links": [],
        "cube:dimensions": {
            "x": {"type": "spatial", "axis": "x", "extent": [-180.0, 180.0], "reference_system": 4326},
            "y": {"type": "spatial", "axis": "y", "extent": [-56.0, 83.0], "reference_system": 4326},
            "t": {"type": "temporal", "extent": ["2015-07-06T00:00:00Z", None]},
            "bands": {"type": "bands", "values": [b["name"] for b in _S2_BANDS]},
        },
        "summaries": {"eo:bands": _S2_BANDS},
    }
}

FILE_FORMATS: dict[str, Any] = {
    "input": {
        "GeoJSON": {"title": "GeoJSON", "gis_data_types": ["vector"], "parameters": {}},
    },
    "output": {
        "GTiff": {"title": "GeoTiff", "gis_data_types": ["raster"], "parameters": {}},
        "netCDF": {"title": "Network Common Data Form", "gis_data_types": ["raster"], "parameters": {}},
        "JSON": {"title": "JSON", "gis_data_types": ["raster", "vector"], "parameters": {}},
    },
}

# output format (lower case) -> (file extension, media type)
OUTPUT_MEDIA: dict[str, tuple[str, str]] = {
    "gtiff": (".tif", "image/tiff; application=geotiff"),
    "netcdf": (".nc", "application/x-netcdf"),
    "json": (".json", "application/json"),
}


def collection_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The short form of a collection as listed by ``GET /collections``."""
    keep = (
        "type",
        "stac_version",
        "id",
        "title",
        "description",
        "license",
        "keywords",
        "providers",
        "extent",
    )
    return {k: doc[k] for k in keep if k in doc} | {"links": []}
