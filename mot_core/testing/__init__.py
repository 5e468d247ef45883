"""What plugin authors import in their own tests: the conformance check behind ``mot plugins
check`` (like scikit-learn's ``check_estimator``)::

    from mot_core.testing import check_plugin

    def test_my_plugin_conforms():
        report = check_plugin("timeseries")
        assert report.ok, report.text()
"""

from mot_core.testing.conformance import CheckLine, CheckReport, check_plugin, check_plugins, summary_of

__all__ = ["CheckLine", "CheckReport", "check_plugin", "check_plugins", "summary_of"]
