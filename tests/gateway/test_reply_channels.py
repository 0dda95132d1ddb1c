"""Reply channels on the Redis pub/sub layer are dropped after use, not kept subscribed for ever."""

from __future__ import annotations

from channels.layers import get_channel_layer
from django.test import override_settings

from gateway.dispatch import _drop_channel
from tests.conftest import require_service


async def test_a_finished_requests_reply_channel_is_unsubscribed() -> None:
    url = require_service("OPTIMAGPT_TEST_REDIS_URL")
    layers = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [url]}}}
    with override_settings(CHANNEL_LAYERS=layers):
        layer = get_channel_layer()
        for _ in range(20):
            channel = await layer.new_channel("reply.")
            await layer.send(channel, {"type": "node.event", "raw": "{}"})
            assert (await layer.receive(channel))["raw"] == "{}"
            await _drop_channel(channel)
        assert layer._get_layer().channels == {}
        await layer.flush()
