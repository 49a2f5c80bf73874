"""The dashboard's entry point: `streamlit run dashboard/app.py` (or `batchdb dashboard`).

Five pages (st.navigation): Overview, Jobs, Job detail, Providers, Cost. The
database is the one the workers use ($BATCHDB_DSN, else the embedded server),
read through read-only connections; see dashboard/source.py.
"""

from __future__ import annotations

import streamlit as st

from batchdb.dashboard import ui

st.set_page_config(page_title="batchdb", page_icon=":material/database:", layout="wide")
# Narrower side margins than Streamlit's 5rem: wide tables get the room (see ui.FRAME_PX).
st.html("<style>[data-testid='stMainBlockContainer'] {padding-left: 2rem; padding-right: 2rem;}</style>")

page = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", icon=":material/monitoring:", default=True),
        st.Page("views/jobs.py", title="Jobs", icon=":material/list:", url_path="jobs"),
        st.Page("views/job_detail.py", title="Job detail", icon=":material/search:", url_path="job"),
        st.Page("views/providers.py", title="Providers", icon=":material/speed:", url_path="providers"),
        st.Page("views/cost.py", title="Cost", icon=":material/payments:", url_path="cost"),
    ]
)
ui.sidebar(ui.dsn())
page.run()
