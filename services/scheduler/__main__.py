from services.scheduler.service import SchedulerService
from shared.actor import main

main(SchedulerService)
