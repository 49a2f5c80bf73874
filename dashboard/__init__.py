"""The Streamlit dashboard over batchdb's tables, queried with DuckDB (issue 5).

app.py       entry point: st.navigation over views/ (Overview, Jobs, Job detail, Providers, Cost)
queries.py   every query (PostgreSQL and DuckDB) and one loader per page
source.py    read-only PostgreSQL connections, Arrow fetches, DuckDB
ui.py        cached loaders, formatting, charts, the database guard
run.py       run_dashboard(dsn, port): Streamlit as a child process on 127.0.0.1
settings.py  refresh interval and outputs folder, from the environment run.py sets
"""
