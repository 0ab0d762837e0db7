"""churnsignal: churn-risk signals from usage, billing and support event streams."""
