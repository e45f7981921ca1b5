"""The service's HTTP request and response bodies (pydantic) and its error responses.

Every request body refuses unknown fields, non-finite floats, over-long text and oversized lists
with a 422 that names the field; `RequestError` is the service's own refusal (status, message),
and `error_response` the one JSON error shape every status uses. serve.py imports these.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from itemsage.index.by_product import DEFAULT_HALF_LIFE_DAYS

MAX_VERSION_CHARS = 255  # an index version is a directory name
MAX_HISTORY = 1000  # history items (ids or vectors) per home request
MAX_VECTOR_WIDTH = 8192  # a cheap upper bound before the exact width check
MAX_TEXT_CHARS = 2048  # MiniLM reads at most 256 tokens anyway
MAX_UPDATE_BATCH = 1000  # products per upsert or delete request


# ---- request and response bodies ----------------------------------------------------------------

def _utf8(value: str) -> str:
    """Refuse a string that cannot be written as UTF-8 (JSON's `\\ud800` escape alone gives one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid UTF-8: a lone surrogate at character {err.start}; send "
                         "characters outside the Basic Multilingual Plane as a surrogate pair or as UTF-8") from None
    return value


# Strict: a JSON number for a float (integers too), never true/false or "1.5"; a JSON string for a str.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Vector = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_VECTOR_WIDTH)]
Text = Annotated[str, Field(strict=True), AfterValidator(_utf8)]
ProductId = Annotated[Text, Field(min_length=1, max_length=1024)]
TopK = Annotated[int, Field(strict=True, description="Number of results; 1 <= k <= the server's max_k.")]
StrictBool = Annotated[bool, Field(strict=True)]
TextValue = Optional[Text | list[Text]]
StrictInt = Annotated[int, Field(strict=True)]
# A product field beyond the text fields: a filterable attribute of the index (a string, a list of strings,
# a number, a boolean, a time as an ISO-8601 string), or a text field of a model trained on more fields.
ExtraValue = Optional[Text | list[Text] | StrictBool | StrictInt | FiniteFloat]
MAX_FILTER_COLUMNS = 64


def _filter_size(value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if value is not None and len(value) > MAX_FILTER_COLUMNS:
        raise ValueError(f"a filter names at most {MAX_FILTER_COLUMNS} columns, got {len(value)}")
    return value


FILTER_DESCRIPTION = (
    "Only products that pass every condition come back (k of them whenever k pass); keys are the index's "
    "filterable columns (GET /v1/filters, or the 422 for an unknown one lists them). A condition is a value "
    '(`"brand": "acme"`; a list column passes when any element matches), a list of values (`"category": '
    '["shoes", "boots"]`), `{"not": [...]}`, a range on numbers and times (`"price": {"gte": 10, "lt": 50}`, '
    '`"listed_at": {"gte": "2026-01-01T00:00:00Z"}`) or a boolean (`"in_stock": true`). A product without a '
    "value passes only `not`.")
Filter = Annotated[Optional[dict[str, Any]], AfterValidator(_filter_size),
                   Field(description=FILTER_DESCRIPTION, examples=[{"category": ["shoes"], "in_stock": True}])]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _exactly_one(body: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(body, n) is not None]
    if len(given) != 1:
        options = ", ".join(f"`{n}`" for n in names)
        got = ", ".join(f"`{n}`" for n in given) if given else "none"
        raise ValueError(f"give exactly one of {options}; got {got}")


class SearchRequest(_Body):
    text: Optional[Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = None
    vector: Optional[Vector] = Field(None, description="A precomputed search-query vector (instead of text).")
    k: TopK = 10
    filter: Filter = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        _exactly_one(self, ("text", "vector"))
        return self


class CloseupRequest(_Body):
    product_id: Optional[ProductId] = Field(None, description="An indexed product: find products like it.")
    vector: Optional[Vector] = Field(
        None, description="A closeup query vector: the kind of vector the closeup rows of the training logs held "
        "as query_embedding (the demo shop: the viewed product's image vector; a shop's own logs may hold text "
        "or other vectors), of that width (GET /readyz: query_dims.closeup). The model's closeup adapter maps "
        "it into product space.")
    image: Optional[Text] = Field(None, description="An image file's bytes, base64-encoded.")
    k: TopK = 10
    exclude_self: StrictBool = Field(True, description="With product_id: leave the product itself out.")
    exclude: Optional[Annotated[list[ProductId], Field(max_length=MAX_HISTORY)]] = Field(
        None, description="Product ids to leave out of the results (e.g. what the user has seen); k results "
        "still come back when the catalog has them. Ids not in the index are ignored.")
    filter: Filter = None
    product_to_product: StrictBool = Field(
        False, description="With product_id: search with the product's learned ItemSage embedding "
        "(product-to-product similarity in the product space, a path the model was not trained for) instead of "
        "the default, its frozen query vector (main image, or title text vector) through the closeup adapter, "
        "as the closeup logs were trained.")

    @model_validator(mode="after")
    def _one_query(self) -> CloseupRequest:
        _exactly_one(self, ("product_id", "vector", "image"))
        if self.product_to_product and self.product_id is None:
            raise ValueError("`product_to_product` needs `product_id`")
        return self


class HomeRequest(_Body):
    history: Optional[Annotated[list[ProductId], Field(min_length=1, max_length=MAX_HISTORY)]] = Field(
        None, description="Product ids the user engaged with: their frozen query vectors are clustered and each cluster's medoid goes through the home adapter. They are "
        "left out of the results unless keep_history."
    )
    vectors: Optional[Annotated[list[Vector], Field(min_length=1, max_length=MAX_HISTORY)]] = Field(
        None, description="History as frozen query vectors of the home query width (instead of ids), "
        "clustered the same way."
    )
    k: TopK = 10
    max_clusters: Annotated[int, Field(strict=True, ge=1, le=20, description=(
        "Most interest clusters the history is split into (PinnerSage: Ward clustering of the history's "
        "vectors); each cluster's medoid retrieves a share of k by its importance. 1 = one cluster."))] = 5
    times: Optional[Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_HISTORY)]] = Field(
        None, description="When each history item was engaged, as Unix time in seconds, one per item: a "
        "cluster's importance becomes its time-decayed count (each item weighs 0.5 ** (age / half_life_days)), "
        "as in PinnerSage. Without times every item counts 1.")
    now: Optional[FiniteFloat] = Field(None, description="With times: the time ages are measured from (Unix "
                                       "seconds); default the latest of `times`.")
    half_life_days: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False, description=(
        "With times: the age in days at which an engagement counts half."))] = DEFAULT_HALF_LIFE_DAYS
    keep_history: StrictBool = Field(False, description="With history: also return products of the history "
                                     "(left out by default).")
    exclude: Optional[Annotated[list[ProductId], Field(max_length=MAX_HISTORY)]] = Field(
        None, description="More product ids to leave out of the results; ids not in the index are ignored.")
    filter: Filter = None

    @model_validator(mode="after")
    def _one_history(self) -> HomeRequest:
        _exactly_one(self, ("history", "vectors"))
        given = len(self.history if self.history is not None else self.vectors or [])
        if self.times is not None and len(self.times) != given:
            raise ValueError(f"`times` has {len(self.times)} values for {given} history items; send one per item")
        if self.now is not None and self.times is None:
            raise ValueError("`now` needs `times`")
        return self


class ProductIn(BaseModel):
    """One product as in the catalog: text fields (a string or a list of strings) and image vectors.

    Fields beyond the twelve standard ones are accepted when the model was trained on them, or when they
    are filterable columns of the served index (`price`, `in_stock`, `listed_at`, ...: GET /v1/filters);
    an upsert replaces the product whole, its filterable values included (one it leaves out is empty).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    __pydantic_extra__: dict[str, ExtraValue]

    product_id: Optional[ProductId] = None
    title: TextValue = None
    description: TextValue = None
    brand: TextValue = None
    colors: TextValue = None
    materials: TextValue = None
    patterns: TextValue = None
    size: TextValue = None
    size_type: TextValue = None
    product_type: TextValue = None
    category: TextValue = None
    domain: TextValue = None
    links: TextValue = None
    image_embeddings: Optional[list[Vector]] = Field(None, description="Image vectors, main image first.")


class EmbedRequest(_Body):
    product: ProductIn


class Candidates(BaseModel):
    ids: list[str]
    scores: list[float] = Field(description="Inner products of unit vectors; higher = more similar.")
    index_version: str


class Cluster(BaseModel):
    medoid: int = Field(description="Position in the request's history of the cluster's medoid.")
    size: int
    importance: float = Field(description="The cluster's share of the history's importance: its share of the "
                              "items, or with `times` of their time-decayed count (PinnerSage). Clusters come "
                              "most important first.")
    members: list[int]


class HomeResponse(Candidates):
    clusters: list[Cluster]
    cluster_of: list[int] = Field(description="For each result, the cluster whose medoid scored it best.")


UNREADABLE = ("the model reads nothing of this product: it has no image and no word of its text is in the "
              "model's vocabulary, so its vector is exactly that of an empty product")


class EmbedResponse(BaseModel):
    product_id: Optional[str]
    vector: list[float]
    dim: int
    model_fingerprint: str
    unreadable: bool = Field(False, description="True when " + UNREADABLE.removeprefix("the model reads nothing "
                             "of this product: ") + " (e.g. text in another language than the training catalog's).")
    warning: Optional[str] = Field(None, description="Why the vector may not be what was meant (set when unreadable).")


class ReloadRequest(_Body):
    version: Optional[Annotated[Text, Field(min_length=1, max_length=MAX_VERSION_CHARS)]] = Field(
        None, description="Version name under INDEX_ROOT/versions; default: the one CURRENT points at.")
    persist: StrictBool = Field(True, description="Also point INDEX_ROOT/CURRENT at the version (atomically), "
                                "so a restarted server serves it; false for a trial swap.")


class ReloadResponse(BaseModel):
    index_version: str
    previous_version: str
    products: int
    seconds: float


class UpsertRequest(_Body):
    products: Annotated[list[ProductIn], Field(min_length=1, max_length=MAX_UPDATE_BATCH)] = Field(
        description="Products with their `product_id`: new ones are added, existing ones replaced.")


class DeleteRequest(_Body):
    ids: Annotated[list[ProductId], Field(min_length=1, max_length=MAX_UPDATE_BATCH)]


class UpdateResponse(BaseModel):
    ids: list[str] = Field(description="Products upserted (or deleted), in request order.")
    unknown: list[str] = Field(default_factory=list, description="Delete: ids not in the index (nothing done).")
    seq: int = Field(description="The last update's number in the live log (durable on reply).")
    index_version: str
    products: int = Field(description="Products served after the update.")
    unreadable: list[str] = Field(default_factory=list, description="Upserted products the model reads nothing of "
                                  "(no image, no word in its vocabulary): each got the vector of an empty product.")


# ---- errors -------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the service refuses: `status` is a 4xx (or 503), `message` says what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _printable(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (a lone surrogate from the request) as a `\\udXXX` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON body of every refusal, {"detail": message, ...}; always encodable, whatever the request held."""
    return JSONResponse({"detail": _printable(detail), **extra}, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        detail = (e.get("ctx") or {}).get("error")
        why = f" ({detail})" if isinstance(detail, str) else ""  # e.g. the JSON decoder's reason
        parts.append(f"{loc}: {e.get('msg', 'invalid')}{why}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more
