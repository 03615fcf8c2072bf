"""Shared fixtures: the default model is fetched once (sha256-checked) and loaded once.

Every test that uses a model with weights (through these fixtures) is marked ``model``
here, so ``make test-fast`` (``pytest -m "not model"``) runs everything else in seconds;
tests that load weights or compile some other way carry the mark themselves.
"""

from __future__ import annotations

import pytest

import guardrail  # noqa: F401  (llama.cpp before numpy)

#: fixtures that fetch or load a model with weights, or every llama.cpp model file there is (test_templates'
#: ``vocabs``: the 19 tokenizer families of llama-cpp-python's sdist, loaded together): a test using one,
#: even indirectly, is a ``model`` test. Single vocab-only loads (``default_vocab``, ``corpus_vocabs``) are not.
MODEL_FIXTURES = frozenset({"model_path", "model", "gemma_path", "vocabs"})


@pytest.fixture(scope="session", autouse=True)
def _one_tls_context():
    """Every URL the tests call is plain http on loopback, yet each httpx client reads the CA bundle
    (30 ms a client, some hundred clients a run): they share one context instead."""
    try:
        import httpx._transports.default as transport
    except ImportError:
        yield
        return
    real = transport.create_ssl_context
    shared = real()

    def create(verify=True, cert=None, trust_env=True):
        if verify is True and cert is None and trust_env:
            return shared
        return real(verify=verify, cert=cert, trust_env=trust_env)

    transport.create_ssl_context = create
    yield
    transport.create_ssl_context = real


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def model_path():
    import os

    from guardrail.artifacts.models import fetch_model
    from guardrail.errors import ArtifactError

    try:
        return fetch_model()
    except ArtifactError as exc:  # no PyPI and no cache: these tests cannot run here
        if os.environ.get("CI"):  # ...but CI must never pass by skipping them
            raise
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def model(model_path):
    from guardrail.runtime.engine import Model

    loaded = Model(model_path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def gemma_path():
    """The second architecture (Gemma 3 270M base), fetched once."""
    import os

    from guardrail.artifacts.models import fetch_model
    from guardrail.errors import ArtifactError

    try:
        return fetch_model("gemma3-270m")
    except ArtifactError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Gemma 3 unavailable: {exc}")


@pytest.fixture(scope="session")
def default_vocab():
    """The default model's tokenizer alone (vocab-only: no weights, no context): a fast-loop fixture."""
    import os

    from guardrail.artifacts.models import fetch_model
    from guardrail.errors import ArtifactError
    from guardrail.runtime.engine import Model

    try:
        path = fetch_model()
    except ArtifactError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model unavailable: {exc}")
    vocab = Model(path, vocab_only=True)
    yield vocab
    vocab.close()


class _VocabFamilies(dict):
    """llama.cpp's vocab-only GGUFs by tokenizer family, each loaded on first use."""

    def __init__(self, corpus):
        super().__init__()
        self.corpus = corpus

    def __missing__(self, family):
        from guardrail.runtime.engine import Model

        self[family] = Model(self.corpus.vocabs[family], vocab_only=True)
        return self[family]


@pytest.fixture(scope="session")
def corpus_vocabs():
    import os

    from guardrail.artifacts.corpus import fetch_corpus
    from guardrail.errors import ArtifactError

    try:
        families = _VocabFamilies(fetch_corpus())
    except ArtifactError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"template corpus unavailable: {exc}")
    yield families
    for vocab in families.values():
        vocab.close()
