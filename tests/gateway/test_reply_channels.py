"""Reply channels on the Redis pub/sub layer are dropped after use, not kept subscribed for ever."""

from __future__ import annotations

import pytest
from channels.layers import get_channel_layer
from django.test import override_settings

from gateway.dispatch import InferenceCall, _drop_channel
from gateway.principal import Principal
from gateway.routing.router import Target
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


async def test_an_event_arriving_after_a_wait_timed_out_is_not_lost() -> None:
    """A call waits for its first event in steps (LINK_CHECK_S). On the pub/sub layer a cancelled receive
    unsubscribes the channel, so a step that timed out used to lose the event sent next (seen in CI: a
    request through a second gateway whose node answered after three steps never got its reply)."""
    url = require_service("OPTIMAGPT_TEST_REDIS_URL")
    layers = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [url]}}}
    with override_settings(CHANNEL_LAYERS=layers):
        layer = get_channel_layer()
        channel = await layer.new_channel("reply.")
        call = InferenceCall(Target(executor_pk=0, executor_key="k", channel_name="node"), "rid", channel,
                             Principal(user_id=None))
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await call._receive(0.05)
        await layer.send(channel, {"type": "node.event", "raw": '{"type": "end", "n": 1}'})
        await layer.send(channel, {"type": "node.event", "raw": '{"type": "end", "n": 2}'})
        assert (await call._receive(5))["n"] == 1
        assert (await call._receive(5))["n"] == 2
        with pytest.raises(TimeoutError):
            await call._receive(0.05)
        call.finished = True
        await call.close()
        assert layer._get_layer().channels == {}
        await layer.flush()
