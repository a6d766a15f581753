"""The cloud sink: stores every record that arrives, exactly once, and answers queries."""
