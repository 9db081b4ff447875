"""`default`: one device, no tf.distribute strategy."""

from tfpar.strategies import base


class DefaultAdapter(base.StrategyAdapter):
    """Plain single-device training: the reference every strategy is tested against."""

    name = "default"
