"""The Streamlit dashboard over batchdb's tables, queried with DuckDB (issue 5)."""
