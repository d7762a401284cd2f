"""What two or more dpserve services use: message schemas, subjects, the bus, config, logging."""
