"""The decision path: observe -> decide -> switch -> generate, timed.

Below the environments and the runtime, above profiles, telemetry and measure: the live
environment, the recorder, :class:`casrap.runtime.AdaptiveLM`, ``casrap serve`` and
``casrap loadtest`` all run requests through :class:`casrap.decide.router.Router`, so what
is trained is what runs.

- :mod:`casrap.decide.analysis`: prompt features (length, perplexity under the full model);
- :mod:`casrap.decide.observation`: the observation vector and its spec version;
- :mod:`casrap.decide.defaults`: what a request that leaves something out gets;
- :mod:`casrap.decide.generation`: timed generation (TTFT, per-token clock);
- :mod:`casrap.decide.generators`: which generator a profile kind runs with (dense,
  compressed KV, prompt lookup) and what it refuses, so the Router can mask it;
- :mod:`casrap.decide.router`: the Router.
"""
