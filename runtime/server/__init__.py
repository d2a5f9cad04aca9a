"""The OpenAI-compatible server over a bundle (FastAPI + uvicorn + prometheus-client, no torch).

async_engine.py runs the continuous-batching engine on its own thread; app.py is the HTTP API;
metrics.py the Prometheus metrics; cli.py the `serve` command shared by `dspark-export serve`
and the torch-free `dspark-serve`.
"""
