"""The feature network of the sample-quality tests: tiny settings (trained in about a second) in a temporary cache,
never the user's. Test modules import the fixture (``from evaluation_fixtures import tiny_feature_net``)."""
import pytest

from genfast import feature_net

TINY_FEATURES = feature_net.FeatureNetSettings(num_faces=512, holdout=64, epochs=2, width=8, feature_dim=32)


@pytest.fixture
def tiny_feature_net(tmp_path_factory, monkeypatch):
    """(network, record) of :data:`TINY_FEATURES`, made the default for the test, with ``$GENFAST_CACHE_DIR`` a
    temporary folder of the test process (so the network is trained once per process)."""
    monkeypatch.setenv(feature_net.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "genfast-cache"))
    monkeypatch.setattr(feature_net, "DEFAULT_SETTINGS", TINY_FEATURES)
    return feature_net.load_feature_net(quiet=True)
