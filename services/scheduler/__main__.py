from services.scheduler.worker import SchedulerService
from shared.actor import main

main(SchedulerService)
