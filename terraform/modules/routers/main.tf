# The routers behind an Application Load Balancer: HTTPS with the operator's certificate (HTTP
# is redirected), WebSockets kept open as long as Kiln's own session limit, the target group's
# health check on /readyz (which fails at once when a router starts to drain), and the routers
# themselves as a service group.

resource "aws_lb" "this" {
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = var.public_subnet_ids
  security_groups            = [var.alb_security_group_id]
  idle_timeout               = var.idle_timeout_s
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection

  dynamic "access_logs" {
    for_each = var.access_log_bucket == null ? [] : [1]
    content {
      bucket  = var.access_log_bucket
      prefix  = var.name
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "routers" {
  name                 = var.name
  port                 = var.router_port
  protocol             = "HTTP"
  vpc_id               = var.vpc_id
  deregistration_delay = var.drain_s

  health_check {
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  stickiness {
    type    = "lb_cookie"
    enabled = false
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.routers.arn
  }
}

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      port        = "443"
      protocol    = "HTTPS"
      status_code = "HTTP_301"
    }
  }
}

module "routers" {
  source            = "../service"
  name              = "${var.name}-router"
  part              = "router"
  region            = var.region
  package           = var.package
  settings          = merge(var.settings, { KILN_HOST = "0.0.0.0", KILN_PORT = tostring(var.router_port) })
  secrets           = var.secrets
  database_host     = var.database_host
  redis_host        = var.redis_host
  ami_id            = var.ami_id
  instance_type     = var.instance_type
  min_size          = var.min_size
  max_size          = var.max_size
  subnet_ids        = var.private_subnet_ids
  security_group_id = var.router_security_group_id
  instance_profile  = var.instance_profile
  target_group_arns = [aws_lb_target_group.routers.arn]
  stop_timeout_s    = var.drain_s + 15
  kms_key_arn       = var.kms_key_arn
}

resource "aws_autoscaling_policy" "cpu" {
  name                   = "${var.name}-cpu"
  autoscaling_group_name = module.routers.autoscaling_group_name
  policy_type            = "TargetTrackingScaling"
  target_tracking_configuration {
    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
    target_value = var.target_cpu_percent
  }
}
